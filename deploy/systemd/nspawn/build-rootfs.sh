#!/usr/bin/env bash
# Build a minimal Debian bookworm root file system that systemd-nspawn can boot with systemd as
# PID 1, for end-to-end tests of the Stanchion units (Type=notify, WatchdogSec, Restart=).
#
#   deploy/systemd/nspawn/build-rootfs.sh [DIR]        (default DIR: build/nspawn-rootfs)
#
# Needs root and the Debian packages debootstrap and systemd-container
# (apt-get install -y --no-install-recommends debootstrap systemd-container).
# Takes a few minutes once (it downloads ~100 packages from the Debian mirror); the result is reused
# while DIR/.stanchion-rootfs-ready exists. Boot it with:
#
#   timeout 60 systemd-nspawn -q --register=no --keep-unit -D DIR --boot
#
# --register=no --keep-unit are required where the host has no systemd-machined or system bus (CI
# containers). A unit enabled inside DIR that ends with `systemctl poweroff` makes the boot return.
set -euo pipefail

DIR=${1:-build/nspawn-rootfs}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ -e "$DIR/.stanchion-rootfs-ready" ]; then
    echo "build-rootfs: $DIR is ready (remove it to rebuild)" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-rootfs: debootstrap needs root" >&2
    exit 1
fi
for tool in debootstrap systemd-nspawn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build-rootfs: $tool is missing: apt-get install -y --no-install-recommends debootstrap systemd-container" >&2
        exit 1
    fi
done

rm -rf "$DIR"
mkdir -p "$(dirname "$DIR")"
start=$(date +%s)
debootstrap --variant=minbase --include=systemd,systemd-sysv,python3 "$SUITE" "$DIR" "$MIRROR"

# A booted container with no console login and no network configuration: keep it quiet and fast.
echo stanchion-nspawn >"$DIR/etc/hostname"
: >"$DIR/etc/machine-id"
ln -sf /dev/null "$DIR/etc/systemd/system/getty@.service"
ln -sf /dev/null "$DIR/etc/systemd/system/console-getty.service"
ln -sf /dev/null "$DIR/etc/systemd/system/systemd-networkd-wait-online.service"
ln -sf /dev/null "$DIR/etc/systemd/system/systemd-timesyncd.service"
mkdir -p "$DIR/opt/stanchion" "$DIR/out"

touch "$DIR/.stanchion-rootfs-ready"
echo "build-rootfs: $DIR built in $(( $(date +%s) - start )) s ($(du -sh "$DIR" | cut -f1))" >&2

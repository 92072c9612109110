#!/usr/bin/env bash
# Build a minimal Debian bookworm root file system that systemd-nspawn can boot with systemd as
# PID 1, for end-to-end tests of the Stanchion units (Type=notify, WatchdogSec, Restart=):
# tests/deploy/test_systemd_e2e.py uses it.
#
#   deploy/systemd/nspawn/build-rootfs.sh [DIR]        (default DIR: build/nspawn-rootfs)
#
# Needs root and the Debian packages debootstrap and systemd-container
# (apt-get install -y --no-install-recommends debootstrap systemd-container).
# debootstrap takes a minute or two once (it downloads ~100 packages from the Debian mirror; set
# MIRROR= for a local one); its result is reused while DIR/.stanchion-rootfs-ready exists. The
# settings after it (host name, masked units, the agent's system user, mount points) are applied on
# every run, and cheaply, so a root file system built by an older version of this script gets them.
# Boot it with:
#
#   timeout 60 systemd-nspawn -q --register=no --keep-unit -D DIR --boot
#
# --register=no --keep-unit are required where the host has no systemd-machined or system bus (CI
# containers). A unit enabled inside DIR that ends with `systemctl poweroff` makes the boot return.
# Add --volatile=overlay to keep DIR unchanged (writes go to a tmpfs that is thrown away).
set -euo pipefail

DIR=${1:-build/nspawn-rootfs}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" != 0 ]; then
    echo "build-rootfs: debootstrap and chroot need root" >&2
    exit 1
fi

if [ ! -e "$DIR/.stanchion-rootfs-ready" ]; then
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
    touch "$DIR/.stanchion-rootfs-ready"
    echo "build-rootfs: debootstrap of $DIR took $(( $(date +%s) - start )) s ($(du -sh "$DIR" | cut -f1))" >&2
else
    echo "build-rootfs: reusing $DIR (remove it to rebuild)" >&2
fi

# A booted container with no console login and no network configuration: keep it quiet and fast.
echo stanchion-nspawn >"$DIR/etc/hostname"
: >"$DIR/etc/machine-id"
for unit in getty@.service console-getty.service systemd-networkd-wait-online.service systemd-timesyncd.service; do
    ln -sfn /dev/null "$DIR/etc/systemd/system/$unit"
done
# The agent's system user, as docs/deploy.md creates it on a GPU node.
if ! grep -q '^stanchion:' "$DIR/etc/passwd"; then
    chroot "$DIR" useradd --system --home-dir /var/lib/stanchion-agent --shell /usr/sbin/nologin stanchion
fi
# Mount points for the test's bind mounts (nspawn cannot create them in a read-only tree).
mkdir -p "$DIR/opt/stanchion/venv" "$DIR/etc/stanchion" "$DIR/mnt/checkpoints/stanchion" \
    "$DIR/usr/local/lib/systemd/system" "$DIR/out"
echo "build-rootfs: $DIR is ready" >&2

"""End to end under a real systemd: the agent unit as shipped starts and reports READY=1; made to
hang, it is killed by its watchdog (SIGABRT, with the Python stacks in the journal) and restarted.

How it runs (docs/deploy.md, "End-to-end under a real systemd"):

- `deploy/systemd/nspawn/build-rootfs.sh` builds a minimal Debian bookworm with systemd into
  `build/nspawn-rootfs` (debootstrap, 1-2 minutes once); later runs reuse it.
- `systemd-nspawn --boot` starts systemd as PID 1 in it. `--volatile=overlay` leaves the cached tree
  unchanged, and `--private-network` leaves the container only its loopback. Read-only bind mounts
  make the real agent runnable at the path the unit names: this repository and its venv at their own
  paths, the venv again at /opt/stanchion/venv, and the Python installation the venv was made from.
- `deploy/systemd/stanchion-agent.service` is installed byte for byte. A drop-in
  (`nspawn/stanchion-agent-e2e.conf`) shortens WatchdogSec, RestartSec and TimeoutStartSec; it relaxes
  no hardening and keeps the user and the command line. /etc/stanchion holds what docs/deploy.md
  installs on a node: agent.env, naming a coordinator nobody listens on (the agent reports READY
  without one and retries registration with backoff), an empty agent.toml, and TLS files from
  `stanchion certs init`, which the unit loads as credentials for `--tls-dir %d`.
- A oneshot probe unit (`nspawn/stanchion-e2e-probe.service` and `.sh`) starts after the agent's
  start job. It records the agent's state, SIGSTOPs it, and waits for the watchdog kill and the
  restart. Then it copies the journal to a bind-mounted directory and powers the container off.

The machine has to allow this. It needs root, systemd-nspawn (package systemd-container), and, for
the first run, debootstrap and a Debian mirror. If anything is missing, the test fails and says what
is missing and how to fix it; it never skips.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest
from deploy_tools import DEPLOY, REPO, run

SYSTEMD = DEPLOY / "systemd"
NSPAWN = SYSTEMD / "nspawn"
ROOTFS = REPO / "build" / "nspawn-rootfs"
ROOTFS_READY = ROOTFS / ".stanchion-rootfs-ready"  # written by build-rootfs.sh after debootstrap
UNIT = "stanchion-agent.service"
PROBE_UNIT = "stanchion-e2e-probe.service"
# The drop-in's WatchdogSec=5s, as systemd hands it to the agent in $WATCHDOG_USEC.
WATCHDOG_USEC = 5_000_000
# The path ExecStart= names; the test's venv is bind-mounted there.
INSTALLED_VENV = "/opt/stanchion/venv"
# The first debootstrap downloads ~100 packages; a slow mirror gets room.
BUILD_TIMEOUT_S = 900
# One boot normally takes about 30 s. The worst case is bounded inside the container: the agent's
# start job by the drop-in's TimeoutStartSec=90s, then the probe by its TimeoutStartSec=150s.
BOOT_TIMEOUT_S = 300
INSTALL = "apt-get install -y --no-install-recommends debootstrap systemd-container  (or `make system-deps`)"

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + 60)


@dataclasses.dataclass
class Boot:
    """What the probe recorded in one boot (file formats: stanchion-e2e-probe.sh)."""

    out: Path
    console: str

    def text(self, name: str) -> str:
        path = self.out / name
        return path.read_text(errors="replace") if path.exists() else ""

    def env(self, name: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text(name).splitlines() if "=" in line)

    @property
    def journal(self) -> str:
        return self.text("journal.txt")

    def agent_pids(self, message: str) -> list[int]:
        """PIDs of the agent processes that logged ``message``, in journal order."""
        return [int(pid) for pid in re.findall(rf"stanchion\[(\d+)\]: .*{re.escape(message)}", self.journal)]

    def report(self) -> str:
        """Everything the probe wrote, for assertion messages."""
        parts = [
            f"--- {name}\n{self.text(name)}"
            for name in ("probe.log", "ready.env", "steady.env", "hung.env", "restarted.env")
        ]
        parts.append(f"--- timeline.log (last lines)\n{_tail(self.text('timeline.log'), 12)}")
        parts.append(f"--- journal.txt\n{_tail(self.journal, 80)}")
        return "\n".join(parts)


def _tail(text: str, lines: int) -> str:
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", text)  # the container's console is coloured
    return "\n".join(text.splitlines()[-lines:])


def _cannot(why: str, fix: str) -> NoReturn:
    pytest.fail(f"cannot run the agent unit under a real systemd: {why}\nfix: {fix}", pytrace=False)


def _build_rootfs() -> None:
    """Build build/nspawn-rootfs once (debootstrap), or reapply its settings to the cached tree."""
    if not ROOTFS_READY.exists() and shutil.which("debootstrap") is None:
        _cannot(f"debootstrap is not installed, and {ROOTFS} has not been built yet", INSTALL)
    started = time.monotonic()
    try:
        result = run(["bash", str(NSPAWN / "build-rootfs.sh"), str(ROOTFS)], timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _cannot(
            f"build-rootfs.sh did not finish within {BUILD_TIMEOUT_S} s (debootstrap downloading from a slow mirror?)",
            "set MIRROR= to a nearer Debian mirror, or build it once by hand: deploy/systemd/nspawn/build-rootfs.sh",
        )
    if result.returncode != 0:
        mirror = os.environ.get("MIRROR", "http://deb.debian.org/debian")
        _cannot(
            f"build-rootfs.sh exited {result.returncode}:\n{_tail(result.stdout + result.stderr, 25)}",
            f"debootstrap downloads ~100 packages from {mirror}. Offline, set MIRROR= to a reachable "
            f"Debian mirror or apt proxy, or copy a tree built elsewhere by build-rootfs.sh to {ROOTFS}",
        )
    print(f"build-rootfs.sh: {time.monotonic() - started:.0f} s; {_tail(result.stderr, 3)}")


def _python_binds() -> list[tuple[Path, Path]]:
    """(host path, container path) of what the venv's interpreter needs, at the paths it uses."""
    venv, base = Path(sys.prefix), Path(sys.base_prefix)
    if venv == base:
        _cannot(
            f"the tests run from {sys.executable}, not from a virtual environment",
            "run them with `make test`",
        )
    if not (venv / "bin" / "stanchion").exists():
        _cannot(
            f"{venv}/bin/stanchion does not exist", "install the project into the venv: `make install-dev`"
        )
    binds = [(REPO, REPO)]
    if not venv.is_relative_to(REPO):
        binds.append((venv, venv))
    # A venv made from Debian's own python3 (/usr) runs on the container's python3 (same release);
    # binding the host's /usr over the container's would replace its whole system.
    if base.resolve() not in (Path("/usr"), Path("/")):
        binds.append((base.resolve(), base))
    return binds


def _stanchion_uid() -> int:
    for line in (ROOTFS / "etc" / "passwd").read_text().splitlines():
        name, _, uid, *_ = line.split(":")
        if name == "stanchion":
            return int(uid)
    _cannot(f"{ROOTFS}/etc/passwd has no stanchion user", f"rebuild the tree: rm -rf {ROOTFS}")


def _install(tmp: Path, hostname: str) -> dict[str, Path]:
    """The files the container gets, each under tmp; returns them by their path in the container."""
    units = tmp / "units"
    (units / f"{UNIT}.d").mkdir(parents=True)
    (units / "multi-user.target.wants").mkdir()
    shutil.copyfile(SYSTEMD / UNIT, units / UNIT)  # the real unit, unchanged
    shutil.copyfile(NSPAWN / "stanchion-agent-e2e.conf", units / f"{UNIT}.d" / "e2e.conf")
    if any(dst.is_relative_to("/tmp") for _, dst in _python_binds()):
        # A checkout under /tmp is bound at the same path (the venv's paths are absolute), and the
        # unit's PrivateTmp= would hide it from the agent: only then is that one setting relaxed.
        (units / f"{UNIT}.d" / "checkout-in-tmp.conf").write_text("[Service]\nPrivateTmp=no\n")
    shutil.copyfile(NSPAWN / PROBE_UNIT, units / PROBE_UNIT)
    for name in (UNIT, PROBE_UNIT):  # `systemctl enable`
        (units / "multi-user.target.wants" / name).symlink_to(f"../{name}")

    etc = tmp / "etc-stanchion"
    (etc / "tls").mkdir(parents=True)
    (etc / "agent.env").write_text(
        "# Nothing listens on port 1: the agent reports READY and retries registration with backoff.\n"
        "STANCHION_COORDINATOR=127.0.0.1:1\n"
    )
    (etc / "agent.toml").write_text("")  # built-in defaults, as docs/deploy.md installs it
    certs = tmp / "certs"
    result = run(
        [str(Path(sys.prefix) / "bin" / "stanchion"), "certs", "init", str(certs), "--node-id", hostname]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for src, dst in [
        ("ca.pem", "ca.crt"),
        (f"agent-{hostname}.pem", "tls.crt"),
        (f"agent-{hostname}-key.pem", "tls.key"),
    ]:
        shutil.copyfile(certs / src, etc / "tls" / dst)
        (etc / "tls" / dst).chmod(0o600)

    checkpoints = tmp / "checkpoints"  # the shared file system, owned by the agent's user
    checkpoints.mkdir()
    uid = _stanchion_uid()
    os.chown(checkpoints, uid, uid)
    out = tmp / "out"
    out.mkdir()
    return {
        "/usr/local/lib/systemd/system": units,
        "/usr/local/bin/stanchion-e2e-probe": NSPAWN / "stanchion-e2e-probe.sh",
        "/etc/stanchion": etc,
        "/mnt/checkpoints/stanchion": checkpoints,
        "/out": out,
    }


def _nspawn_command(files: dict[str, Path]) -> list[str]:
    # norbind: the repository holds build/nspawn-rootfs, where nspawn mounts the container's own
    # file systems; a recursive bind would show them to the container, and its shutdown hangs
    # unmounting them.
    ro = [f"--bind-ro={src}:{dst}:norbind" for src, dst in _python_binds()]
    ro.append(f"--bind-ro={sys.prefix}:{INSTALLED_VENV}:norbind")
    ro += [
        f"--bind-ro={files[p]}:{p}:norbind"
        for p in ("/usr/local/lib/systemd/system", "/usr/local/bin/stanchion-e2e-probe", "/etc/stanchion")
    ]
    rw = [f"--bind={files[p]}:{p}:norbind" for p in ("/mnt/checkpoints/stanchion", "/out")]
    # /root is 0700 in the tree; the agent's user must reach a Python installed under the host's /root.
    home = (
        ["--tmpfs=/root:mode=0755"] if any(dst.is_relative_to("/root") for _, dst in _python_binds()) else []
    )
    return [
        "timeout", "--kill-after=10", str(BOOT_TIMEOUT_S),
        "systemd-nspawn", "--quiet",
        # No systemd-machined or system bus on CI hosts: no machine registration, no scope unit.
        "--register=no", "--keep-unit",
        "--volatile=overlay", "--private-network",
        "--directory", str(ROOTFS),
        *home, *ro, *rw,
        "--boot",
    ]  # fmt: skip


def _boot_failure(boot: Boot, returncode: int) -> str:
    console = _tail(boot.console, 40)
    hints = [
        ("Operation not permitted", "this machine forbids the namespaces or mounts nspawn needs (an unprivileged container?); run on a VM or a privileged container"),
        ("cgroup", "nspawn found no usable cgroup hierarchy for the container's systemd; run on a host with cgroup v2 or a writable /sys/fs/cgroup"),
        ("overlay", "--volatile=overlay needs overlayfs on the host kernel"),
    ]  # fmt: skip
    errors = "\n".join(line for line in console.lower().splitlines() if "fail" in line or "error" in line)
    hint = next((fix for needle, fix in hints if needle.lower() in errors), None)
    if returncode in (124, 137):
        why = f"the container did not power off within {BOOT_TIMEOUT_S} s"
    else:
        why = f"systemd-nspawn exited {returncode} before the probe ran"
    return f"{why}; the probe recorded nothing.\n{hint or 'see the console output below'}\n--- console\n{console}"


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Boot:
    if sys.platform != "linux":
        _cannot(f"systemd-nspawn needs Linux, this is {sys.platform}", "run the tests on Linux")
    if os.geteuid() != 0:
        _cannot(
            "debootstrap, chroot and systemd-nspawn need root", "run the tests as root (`sudo make test`)"
        )
    if shutil.which("systemd-nspawn") is None:
        _cannot("systemd-nspawn is not installed", INSTALL)

    ROOTFS.parent.mkdir(parents=True, exist_ok=True)
    with open(ROOTFS.parent / "nspawn-rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, and none while a container runs
        _build_rootfs()
        fcntl.flock(lock, fcntl.LOCK_SH)  # containers from the same tree may run side by side

        hostname = (ROOTFS / "etc" / "hostname").read_text().strip()
        tmp = tmp_path_factory.mktemp("nspawn")
        files = _install(tmp, hostname)
        cmd = _nspawn_command(files)
        started = time.monotonic()
        with open(tmp / "console.log", "w") as console:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                timeout=BOOT_TIMEOUT_S + 30,
            )
    boot = Boot(out=files["/out"], console=(tmp / "console.log").read_text(errors="replace"))
    print(f"boot, probe and power-off: {time.monotonic() - started:.0f} s (exit {result.returncode})")
    print(" ".join(cmd))
    if not (boot.out / "ready.env").exists():
        pytest.fail(_boot_failure(boot, result.returncode), pytrace=False)
    return boot


def test_unit_files_load_without_warnings(boot: Boot) -> None:
    """The drop-in and the probe unit load cleanly: systemd only warns about unknown keys and bad
    values (a misplaced SuccessAction= once kept the container from powering off)."""
    # systemd's form: "/usr/local/lib/systemd/system/UNIT:LINE: Unknown key ..., ignoring."
    warnings = re.findall(r".*/usr/local/lib/systemd/system/\S+:\d+: .*", _tail(boot.console, 10_000))
    assert not warnings, "\n".join(warnings)


def test_agent_starts_and_reports_ready(boot: Boot) -> None:
    ready, steady = boot.env("ready.env"), boot.env("steady.env")
    # Type=notify: the start job ends at READY=1, and only then does the probe run.
    assert (ready.get("ActiveState"), ready.get("SubState"), ready.get("Result")) == (
        "active",
        "running",
        "success",
    ), boot.report()
    assert ready["NRestarts"] == "0", boot.report()
    assert ready["AgentEnvWatchdogUsec"] == str(WATCHDOG_USEC), boot.report()
    assert f"Started {UNIT}" in boot.journal, boot.report()
    assert boot.agent_pids("rendezvous store on")[:1] == [int(ready["MainPID"])], boot.report()
    # Two watchdog periods later the same process still runs: its WATCHDOG=1 pings arrive.
    assert (steady.get("ActiveState"), steady.get("SubState"), steady.get("NRestarts")) == (
        "active",
        "running",
        "0",
    ), boot.report()
    assert steady["MainPID"] == ready["MainPID"], boot.report()


def test_hung_agent_is_killed_by_its_watchdog(boot: Boot) -> None:
    hung = boot.env("hung.env")
    assert hung.get("ProcState", "").startswith("T"), boot.report()  # stopped: it cannot ping
    assert f"Watchdog timeout (limit {WATCHDOG_USEC // 1_000_000}s)!" in boot.journal, boot.report()
    assert f"Killing process {hung['MainPID']} (stanchion) with signal SIGABRT" in boot.journal, boot.report()
    # Usually status=6/ABRT. faulthandler's dump is best effort: about one run in ten here it crashes
    # (11/SEGV, "Fatal Python error: Segmentation fault") when the SIGSTOP had caught the main thread
    # starting a thread-pool thread. Either way the signal ended the agent and the result is the same.
    exited = re.search(r"Main process exited, code=(killed|dumped), status=(\d+)/(\w+)", boot.journal)
    assert exited and exited[3] in ("ABRT", "SEGV"), boot.report()
    assert "Failed with result 'watchdog'" in boot.journal, boot.report()
    assert "Result=watchdog" in boot.text("timeline.log"), boot.report()


def test_watchdog_kill_leaves_the_stacks_in_the_journal(boot: Boot) -> None:
    """systemd follows the SIGABRT with SIGCONT, so even a stopped agent runs faulthandler."""
    assert "Fatal Python error: Aborted" in boot.journal, boot.report()
    assert "(most recent call first)" in boot.journal, boot.report()
    frames = re.findall(rf'stanchion\[{boot.env("hung.env")["MainPID"]}\]:\s+File "', boot.journal)
    assert frames, boot.report()


def test_agent_is_restarted_after_the_watchdog_kill(boot: Boot) -> None:
    hung, steady, restarted = boot.env("hung.env"), boot.env("steady.env"), boot.env("restarted.env")
    assert (restarted.get("ActiveState"), restarted.get("SubState"), restarted.get("Result")) == (
        "active",
        "running",
        "success",
    ), boot.report()
    assert int(restarted["NRestarts"]) >= 1, boot.report()
    assert restarted["MainPID"] not in ("0", hung["MainPID"]), boot.report()
    assert "Scheduled restart job, restart counter is at 1." in boot.journal, boot.report()
    assert int(restarted["MainPID"]) in boot.agent_pids("rendezvous store on"), boot.report()
    # The old agent's standby rank outlived it (KillMode=process) and the restarted agent adopted it.
    before, after = set(steady["UnitProcs"].split()), set(restarted["UnitProcs"].split())
    ranks = before - {steady["MainPID"]}
    assert ranks and ranks <= after, boot.report()
    adopted = set(re.findall(r"adopted w\d+ \(pid (\d+)\)", boot.journal))
    assert ranks <= adopted, boot.report()

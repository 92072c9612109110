#!/usr/bin/env python3
"""`make soak`: the integration and chaos suites, run again and again with a CPU hog alongside.

A fault-tolerance suite that passes on a quiet machine can still hide waits that only hold when the
scheduler is kind. This runs the suites ``--passes`` times in a row while ``stress-ng`` keeps every
core busy, stops at the first red pass, and prints how many consecutive passes were green. The hog
is started and stopped by its pid.

    python scripts/soak.py --passes 20 [--hog-load 50] [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITES = ["tests/integration", "tests/chaos"]


def start_hog(workers: int, load: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("stress-ng")
    if exe is None:
        sys.exit("soak: stress-ng is not installed (the Makefile's soak target installs it: `make soak`)")
    # --cpu-load keeps each worker busy that share of the time: the suites still run, slowly.
    return subprocess.Popen(
        [exe, "--cpu", str(workers), "--cpu-load", str(load), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)  # stress-ng's workers are its children, in its own group
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=20, help="consecutive green passes wanted")
    ap.add_argument("--hog-workers", type=int, default=os.cpu_count() or 2, help="stress-ng CPU workers")
    ap.add_argument("--hog-load", type=int, default=50, help="percent load of each hog worker (1-100)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = ap.parse_args(argv)
    if a.passes < 1 or not 1 <= a.hog_load <= 100:
        ap.error("--passes must be >= 1 and --hog-load between 1 and 100")
    hog = start_hog(a.hog_workers, a.hog_load)
    green = 0
    t_all = time.monotonic()
    try:
        for i in range(1, a.passes + 1):
            t0 = time.monotonic()
            r = subprocess.run(
                [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider", *a.pytest_args],
                cwd=REPO,
            )
            took = time.monotonic() - t0
            if r.returncode != 0:
                print(f"soak: pass {i} RED (pytest exit {r.returncode}) after {took:.0f}s", flush=True)
                break
            green += 1
            print(f"soak: pass {i} green in {took:.0f}s ({green} consecutive)", flush=True)
    finally:
        stop(hog)
    print(
        f"soak: {green}/{a.passes} consecutive green passes of {' '.join(SUITES)} under stress-ng "
        f"({a.hog_workers} workers at {a.hog_load}%), {time.monotonic() - t_all:.0f}s in all"
    )
    return 0 if green == a.passes else 1


if __name__ == "__main__":
    sys.exit(main())

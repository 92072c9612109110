"""Run by tests/integration/test_silent_peer.py under torchrun on 2 gloo ranks: rank 1 stays alive but
never joins the collective (a frozen peer); rank 0 waits in the step's agreement all-gather (it
touches WAITING first) until the test drops the FLAG file that stands for a newer assignment, then
must raise CollectiveFailed. Rank 1 exits when RELEASE exists.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from stanchion.sdk import parallel

flag, release, waiting = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
if dist.get_rank() == 1:
    while not release.exists():  # silent, not dead: its connections stay open
        time.sleep(0.05)
    os._exit(0)
parallel.wait_policy.abandon = lambda: "a newer assignment arrived" if flag.exists() else None
result = parallel.start_all_gather_rows(torch.zeros(3, dtype=torch.int64), "step control all-gather")
waiting.touch()
try:
    result()
    print(json.dumps({"raised": None}), flush=True)
except parallel.CollectiveFailed as e:
    print(json.dumps({"raised": str(e), "collective_left": not parallel.current_collective}), flush=True)
release.touch()
os._exit(0)  # the peer exits on its own; nothing to tear down here

"""Run by tests/integration/test_silent_peer.py under torchrun on 2 gloo ranks: rank 1 stays alive but
never joins the collective (a frozen peer); rank 0 waits in the step's agreement all-gather (it
touches WAITING first) until the test drops the FLAG file that stands for a newer assignment, then
must raise CollectiveFailed, leave the broken group at once and form a new one. Rank 1 exits when
RELEASE exists (which rank 0 touches only after all that).
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

from stanchion.sdk import liveness, parallel

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
    raised = None
except parallel.CollectiveFailed as e:
    raised = str(e)
# Leave the broken group while its all-gather is still blocked on the silent peer, and form a new
# one: a destroy that waited for that operation would not return before the peer is released.
parallel.leave_group(broken=True)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
x = torch.ones(2)
dist.all_reduce(x)
out = {"raised": raised, "collective_left": not liveness.current_collective, "reformed": x.tolist()}
print(json.dumps(out), flush=True)
release.touch()
os._exit(0)

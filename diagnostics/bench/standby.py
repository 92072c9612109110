"""`stanchion bench standby`: how soon a warm standby of the built-in trainer trains after its
assignment, at real model sizes, cold (told its config by the assignment) beside warm (told the
running job's config when it started, as an agent does: it built the model while it waited).

Each trial starts ``python -m trainer`` the way an agent starts a standby (``STANCHION_STANDBY=1``,
its own worker directory, one thread), waits for its ``standby`` event, then writes an assignment
(rank 0 of 1, a fresh start, the config as a resolved JSON file, a rendezvous store this process
hosts) and reads the times from the worker's own records: the assignment's write time, the
``started`` event (the group formed and the state restored, the start-up determinism check
included) and the first and second progress records. The first step here is a single micro-batch
of ``--seq-len`` tokens: the figure is about what waits for the model, not about its compute,
which the second step's time shows apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diagnostics.bench.common import REPO, envelope, interleaved, median
from stanchion.files import write_json_atomic
from stanchion.sdk import contract
from stanchion.vocab import EventKind, Resume

MODES = ("cold", "warm")


# Host bytes per parameter of one fp32 AdamW rank: parameter, gradient, two moments, and a snapshot
# of the parameter and both moments.
BYTES_PER_PARAM = 4 * (1 + 1 + 2 + 3)


def fits_with_snapshots(params: int, memory_bytes: int) -> bool:
    """Whether one rank with its in-memory snapshot fits in 80% of this machine's memory."""
    return params * BYTES_PER_PARAM <= 0.8 * memory_bytes


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def preset_config(preset: str, data: Path, seq_len: int, *, snapshots: bool = True) -> dict[str, Any]:
    """The preset's resolved config with the bench's batch: one micro-batch, two steps, no checkpoints
    (and no in-memory snapshots where they would not fit in this machine's memory)."""
    from trainer.config import resolve, to_dict

    overrides: dict[str, Any] = {
        "data": {"path": str(data), "seq_len": seq_len, "micro_batch_size": 1, "global_batch_size": 1},
        "steps": 2,
        "optim": {"warmup_steps": 0},
        "checkpoint_every": 0,
        "eval_batches": 1,
        "threads": 1,
        "device": "cpu",
    }
    if not snapshots:
        overrides["integrity"] = {"snapshot_every": 0}
    return to_dict(resolve(preset, overrides=overrides))


def bench_standby(
    *,
    presets: Sequence[str],
    trials: int,
    data: Path,
    seq_len: int,
    work_dir: Path,
    command: str,
    timeout_s: float,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    load = os.getloadavg()
    configs, snapshots = {}, {}
    for preset in presets:
        path = work_dir / f"config-{preset}.json"
        write_json_atomic(path, preset_config(preset, data, seq_len))
        snapshots[preset] = fits_with_snapshots(model_params(path), physical_memory())
        if not snapshots[preset]:
            write_json_atomic(path, preset_config(preset, data, seq_len, snapshots=False))
        configs[preset] = path
    runs: dict[str, dict[str, list[dict[str, float]]]] = {p: {m: [] for m in MODES} for p in presets}
    for preset in presets:
        for n, (trial, mode) in enumerate(interleaved(MODES, trials)):
            progress(f"{preset} {mode} trial {trial + 1}/{trials}")
            hint = configs[preset] if mode == "warm" else None
            root = work_dir / f"{preset}-{mode}-{n}"
            root.mkdir(parents=True)
            runs[preset][mode].append(trial_times(root, run_standby(root, configs[preset], hint, timeout_s)))
    results = {
        "presets": {
            p: {
                **{m: summarize(runs[p][m]) for m in MODES},
                "trials": {m: runs[p][m] for m in MODES},
                "params": model_params(configs[p]),
                "snapshots": snapshots[p],
            }
            for p in presets
        },
        "seq_len": seq_len,
    }
    for p in presets:
        r = results["presets"][p]
        r["saved_s"] = _sub(r["cold"]["assignment_to_first_step_s"], r["warm"]["assignment_to_first_step_s"])
    return envelope(
        "standby",
        command,
        {"presets": list(presets), "trials": trials, "seq_len": seq_len, "device": "cpu", "threads": 1},
        results,
        notes=[
            "assignment_to_first_step_s: from the assignment file's write to rank 0's first progress record",
            "assignment_to_started_s: to the `started` event: group formed, state restored, start-up check done",
            "ready_s: from the standby's launch to its `standby` event (warm: the model built by then)",
            "second_step_s: the second step's own time: the compute of one micro-batch, for scale",
            "cold: the standby learns its config from the assignment; warm: from STANCHION_STANDBY_CONFIG at launch",
            "medians over the trials; one rank, one thread, on the CPU",
            f"snapshots: false where one rank with its in-memory snapshot ({BYTES_PER_PARAM} bytes per "
            "parameter) would exceed 80% of this machine's memory: integrity.snapshot_every=0 there, so the "
            "start of the generation takes no snapshot",
        ],
        load_at_start=load,
    )


def run_standby(root: Path, config: Path, hint: Path | None, timeout_s: float) -> tuple[float, float]:
    """Start ``python -m trainer`` under ROOT as an agent starts a standby (told ``hint`` as the running
    job's config, if any), wait until it is ready, assign it rank 0 of 1 with ``config``, and let it
    train to the end (ROOT/worker: its files; ROOT/output.log). Returns (launched, assigned) times."""
    import torch.distributed as dist

    from stanchion.waiting import wait_until

    worker = root / "worker"
    paths = contract.WorkerPaths(worker)
    paths.control.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANCHION_")}
    env.update(
        {
            contract.ENV_STANDBY: "1",
            contract.ENV_WORKER_DIR: str(worker),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
    )
    if hint is not None:
        env[contract.ENV_STANDBY_CONFIG] = str(hint)
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    launched = time.time()
    with open(root / "output.log", "w") as log:
        p = subprocess.Popen(
            [sys.executable, "-m", "trainer"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    try:
        wait_until(lambda: event(worker, EventKind.STANDBY), timeout_s, "the standby to be ready")
        assignment = contract.Assignment(
            generation=1,
            rank=0,
            world_size=1,
            local_rank=0,
            local_world_size=1,
            master_addr="127.0.0.1",
            master_port=store.port,
            resume=Resume.FRESH,
            job_id="bench-standby",
            run_dir=str(root / "run"),
            config=str(config),
        )
        assigned = time.time()
        write_json_atomic(paths.assignment_path(1), assignment.to_json())
        code = p.wait(timeout=timeout_s)
        if code != 0:
            raise RuntimeError(f"the standby exited {code}: see {root / 'output.log'}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return launched, assigned


def trial_times(root: Path, times: tuple[float, float]) -> dict[str, float]:
    """A trial's figures, from the standby's own records."""
    launched, assigned = times
    worker = root / "worker"
    ready, started = event(worker, EventKind.STANDBY), event(worker, EventKind.STARTED)
    records = {r["step"]: r for r in read_records(contract.WorkerPaths(worker).progress)}
    return {
        "ready_s": ready["t"] - launched,
        "assignment_to_started_s": started["t"] - assigned,
        "assignment_to_first_step_s": records[1]["t"] - assigned,
        "first_step_s": records[1]["step_time_s"],
        "second_step_s": records[2]["step_time_s"],
    }


def event(worker: Path, kind: str) -> dict[str, Any] | None:
    for e in read_records(worker / "events.jsonl"):
        if e.get("event") == kind:
            return e
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(trials: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    keys = trials[0].keys() if trials else ()
    return {k: median([t[k] for t in trials]) for k in keys}


def model_params(config: Path) -> int:
    import torch

    from trainer.config import from_dict
    from trainer.model import GPT

    cfg = from_dict(json.loads(config.read_text())).model
    if cfg.vocab_size == 0:  # the data's, as the trainer takes it
        from dataclasses import replace

        from trainer.data import TokenData

        cfg = replace(cfg, vocab_size=TokenData(json.loads(config.read_text())["data"]["path"]).vocab_size)
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters())


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b

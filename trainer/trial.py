"""The diagnostic trial of a bisection: a fixed, deterministic workload and its fingerprint trace.

Every group of a bisection round runs exactly the same computation: a model built from a fixed seed,
synthetic token data drawn from the same seed (so no node needs the job's data), ``steps`` optimizer
steps at a fixed world size. The trace is each step's loss bits and the parameter fingerprint after
it. Healthy hardware gives bit-identical traces whichever nodes run it (tests/integration prove this
before the planner relies on it); a node that computes wrong numbers changes the trace.

    python -m trainer.trial --out TRACE.json --steps 8 --seed 0 [--group-rank R --group-size N
                            --master-addr A --master-port P --key K] [--faults FILE]

A node's simulated defect (``--faults``, the integrity issue's compute fault) applies here too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

TRIAL_MODEL = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "max_seq_len": 32, "vocab_size": 256}
TRIAL_BATCH = 8  # sequences per step, all ranks together
TRIAL_SEQ = 32


def trace_key(loss_bits: list[str], fingerprints: list[str]) -> str:
    """The value the planner compares: equal traces give equal keys."""
    h = hashlib.sha256()
    for a, b in zip(loss_bits, fingerprints, strict=True):
        h.update(f"{a}:{b};".encode())
    return h.hexdigest()[:16]


def run_trial(
    *, steps: int, seed: int, rank: int, world: int, faults: list[Any] | None, node: str = ""
) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from stanchion.sdk.faults import FaultInjector
    from stanchion.sdk.fingerprint import digest, fingerprints
    from stanchion.sdk.parallel import GradSync
    from trainer.config import ModelConfig, OptimConfig
    from trainer.model import GPT
    from trainer.optim import build_optimizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = GPT(ModelConfig(**TRIAL_MODEL))
    model.init_weights(seed)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0))
    sync = GradSync(list(model.parameters()))
    injector = FaultInjector(faults, rank=rank, seed=seed, state_dir=None, node=node) if faults else None
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, TRIAL_MODEL["vocab_size"], (steps, TRIAL_BATCH, TRIAL_SEQ + 1), generator=gen)
    per_rank = TRIAL_BATCH // world
    loss_bits, prints = [], []
    for step in range(steps):
        if injector is not None:
            injector.begin_step(step + 1, model)
        batch = data[step, rank * per_rank : (rank + 1) * per_rank]  # (B/world, T+1)
        opt.zero_grad(set_to_none=True)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        sync.all_reduce_mean(world)
        total = loss.detach().double().reshape(1)
        if world > 1:
            dist.all_reduce(total)
        opt.step()
        mean = float(total) / world
        loss_bits.append(struct.pack(">f", mean).hex())
        prints.append(digest(fingerprints(model.named_parameters())[1]))
    return {"loss_bits": loss_bits, "fingerprints": prints, "trace": trace_key(loss_bits, prints)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainer.trial", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-rank", type=int, default=0)
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=0)
    p.add_argument("--key", default="trial", help="store key prefix, unique per trial group")
    p.add_argument("--faults", type=Path, default=None)
    p.add_argument("--timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)
    if TRIAL_BATCH % args.group_size:
        print(f"error: --group-size must divide {TRIAL_BATCH}", file=sys.stderr)
        return 2
    from stanchion.sdk.runtime import die_with_parent

    die_with_parent()
    import datetime

    import torch.distributed as dist

    from stanchion.sdk import faults as faultlib

    t0 = time.time()
    result: dict[str, Any]
    try:
        schedule = faultlib.load(args.faults) if args.faults else None
        if args.group_size > 1:
            store = dist.TCPStore(
                args.master_addr,
                args.master_port,
                is_master=False,
                timeout=datetime.timedelta(seconds=args.timeout_s),
            )
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore(f"trial/{args.key}/", store),
                rank=args.group_rank,
                world_size=args.group_size,
                timeout=datetime.timedelta(seconds=args.timeout_s),
            )
        result = run_trial(
            steps=args.steps,
            seed=args.seed,
            rank=args.group_rank,
            world=args.group_size,
            faults=schedule,
            node=os.environ.get("STANCHION_NODE_ID", ""),
        )
        result.update(ok=True, error="")
    except Exception as e:  # noqa: BLE001 - a failed trial is a result ("inconclusive"), not a crash
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "loss_bits": [],
            "fingerprints": [],
            "trace": "",
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    result["seconds"] = time.time() - t0
    from stanchion.files import write_json_atomic

    write_json_atomic(args.out, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

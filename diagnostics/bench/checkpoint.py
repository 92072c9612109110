"""`stanchion bench checkpoint`: what an asynchronous checkpoint costs the training loop, Stanchion's
beside plain ``torch.distributed.checkpoint.async_save``, on the same state in the same run.

One torchrun job (``checkpoint-worker``) trains the preset with plain DDP (Stanchion's model,
AdamW and batches) and checkpoints it in ABBA rounds, both kinds into their own directories through
the same gloo process group kept for checkpoints, as Stanchion keeps one:

- **plain**: ``dcp.async_save(get_state_dict(model, optimizer))`` as torchtitan-style loops call it:
  DCP's default stager copies the state into new host buffers inside the call;
- **stanchion**: what the guard does at a checkpoint step (stanchion/sdk/guard.py
  ``save_checkpoint``): the state's fingerprint for the manifest, then
  :meth:`stanchion.sdk.checkpoint.CheckpointManager.save` with the process's stager (staging on a
  thread into buffers kept across checkpoints), and the wait for that copy before the next optimizer
  step (``settle``).

Per checkpoint it records the time training was blocked (plain: the call; Stanchion: its
``last_stall_s``, the call and the settle) and the excess wall time of the checkpoint's step and
the ``--window`` steps after it over the round's ordinary steps (whatever the save costs while it
writes in the background shows there, for both kinds alike). Rank 0's records are the figures.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diagnostics.bench.common import envelope, interleaved, median, ratio, resolve_flags, torchrun
from stanchion.files import JsonlWriter, read_jsonl

KINDS = ("plain", "stanchion")
Progress = Callable[[str], None]


def checkpoint_command(
    flags: Sequence[str], run_dir: Path, nproc: int, *, rounds: int, gap: int, window: int
) -> list[str]:
    """torchrun running :func:`checkpoint_worker` on ``nproc`` ranks (this package's ``__main__``)."""
    return torchrun(
        nproc,
        *("-m", "diagnostics.bench", "checkpoint-worker", "--run-dir", str(run_dir)),
        *("--rounds", str(rounds), "--gap", str(gap), "--window", str(window), "--", *flags),
    )


def checkpoint_worker(argv: Sequence[str]) -> int:
    """One rank: train the preset with plain DDP and checkpoint it both ways, in ABBA rounds."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel

    from stanchion.sdk import fingerprint
    from stanchion.sdk.checkpoint import CheckpointManager, new_stager
    from stanchion.sdk.parallel import env_topology, pick_device
    from trainer.config import replace
    from trainer.data import TokenData, get_batch
    from trainer.model import GPT
    from trainer.optim import build_optimizer

    p = argparse.ArgumentParser(prog="checkpoint-worker")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--gap", type=int, required=True)
    p.add_argument("--window", type=int, required=True)
    p.add_argument("flags", nargs=argparse.REMAINDER)
    args = p.parse_args(list(argv))
    cfg = resolve_flags([f for f in args.flags if f != "--"])
    rank, world, local_rank, _ = env_topology()
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, local_rank)
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    ckpt_pg = dist.new_group(backend="gloo")  # checkpoints' own group, as Stanchion keeps one
    data = TokenData(cfg.data.path)
    model = GPT(cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=data.vocab_size))
    model.init_weights(cfg.seed)
    model.to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = build_optimizer(model, cfg.optim, device_type=device.type)
    stager = new_stager(device)
    mgr = CheckpointManager(
        args.run_dir / "stanchion",
        rank=rank,
        keep=2,
        async_save=True,
        events=lambda _name, _fields: None,
        process_group=ckpt_pg,
        stager=stager,
    )
    out = JsonlWriter(args.run_dir / f"checkpoints-rank{rank}.jsonl")
    index = 0

    def step(before_update: Callable[[], Any] = lambda: None) -> float:
        nonlocal index
        t0 = time.perf_counter()
        x, y = get_batch(
            data,
            seed=cfg.seed,
            step=index,
            dp_rank=rank,
            dp_world=world,
            micro_step=0,
            micro_batch_size=cfg.data.micro_batch_size,
            grad_accum=1,
            seq_len=cfg.data.seq_len,
        )
        _, loss = net(x.to(device), y.to(device))
        loss.backward()
        before_update()  # Stanchion: the staging copy is complete before the state is written
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # a host sync: the step is finished
        index += 1
        return time.perf_counter() - t0

    for _ in range(2):  # AdamW's state exists, the first steps' one-off costs are behind
        step()
    for n, (rnd, kind) in enumerate(interleaved(KINDS, args.rounds)):
        ordinary = [step() for _ in range(args.gap)]
        at = step()
        t0 = time.perf_counter()
        if kind == "plain":
            msd, osd = get_state_dict(model, opt)
            fut = dcp.async_save(
                {"model": msd, "optim": osd},
                checkpoint_id=str(args.run_dir / "plain" / f"step-{index:08d}"),
                process_group=ckpt_pg,
            )
            blocked = time.perf_counter() - t0
            after = [step() for _ in range(args.window)]
            fut.result()
        else:
            fields = {"fingerprint": fingerprint.state_digest(model, opt)}  # the manifest's, as the guard
            mgr.save(index, model, opt, fields, since=t0)
            after = [step(mgr.settle if i == 0 else lambda: None) for i in range(args.window)]
            blocked = mgr.last_stall_s
            mgr.wait()
        usual = median(ordinary)
        out.write(
            {
                "n": n,
                "round": rnd,
                "kind": kind,
                "step": index,
                "blocked_s": blocked,
                "checkpoint_step_s": at + blocked,
                "window_excess_s": at + blocked + sum(after) - (1 + args.window) * usual,
                "ordinary_step_s": usual,
                "rank": rank,
            }
        )
        dist.barrier()  # both kinds start each round from the same place
        if rank == 0:  # the plain checkpoints are not needed after their write (Stanchion keeps 2)
            shutil.rmtree(args.run_dir / "plain", ignore_errors=True)
    out.close()
    mgr.close()
    stager.close()
    # DDP sits in a reference cycle: freed now, with the group (see baseline_worker)
    net = model = opt = None  # type: ignore[assignment]
    gc.collect()
    dist.destroy_process_group()
    return 0


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians per kind of rank 0's records, and Stanchion ÷ plain of each."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        mine = [r for r in records if r["kind"] == kind]
        out[kind] = {
            "checkpoints": len(mine),
            "blocked_s": median(r["blocked_s"] for r in mine),
            "window_excess_s": median(r["window_excess_s"] for r in mine),
            "ordinary_step_s": median(r["ordinary_step_s"] for r in mine),
            "blocked_s_each": [round(r["blocked_s"], 4) for r in mine],
        }
    out["blocked_ratio"] = ratio(out["stanchion"]["blocked_s"], out["plain"]["blocked_s"])
    return out


def bench_checkpoint(
    *,
    presets: Sequence[str],
    data: Path,
    nproc: int,
    rounds: int,
    gap: int,
    window: int,
    work_dir: Path,
    command: str,
    timeout_s: float,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    import os
    import subprocess

    import torch

    from diagnostics.bench.trainer import trainer_plan

    load_at_start = os.getloadavg()
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {"presets": {}}
    goals = []
    for preset in presets:
        steps = 2 + 2 * rounds * (gap + 1 + window)
        plan = trainer_plan(preset, data=data, steps=steps, nproc=nproc, cuda=cuda)
        run_dir = work_dir / preset
        run_dir.mkdir(parents=True)
        flags = plan.flags
        progress(f"{preset}: {rounds} rounds of a plain and a Stanchion checkpoint on {nproc} ranks")
        cmd = checkpoint_command(flags, run_dir, nproc, rounds=rounds, gap=gap, window=window)
        log_path = run_dir / "torchrun.log"
        with log_path.open("w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(
                f"checkpoint-worker failed (exit {done.returncode}); its output: {log_path}\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
        records = read_jsonl(run_dir / "checkpoints-rank0.jsonl")
        r = summarize(records)
        r["notes"] = list(plan.notes)
        results["presets"][preset] = r
        goals.append(
            {
                "goal": f"{preset}: Stanchion's checkpoint stall <= plain dcp.async_save's",
                "value": r["blocked_ratio"],
                "target": "<= 1",
                "met": None if r["blocked_ratio"] is None else r["blocked_ratio"] <= 1.0,
            }
        )
    return envelope(
        "checkpoint",
        command,
        {"presets": list(presets), "nproc": nproc, "rounds": rounds, "gap": gap, "window": window},
        results,
        goals=goals,
        notes=[
            "blocked_s: training time blocked by the checkpoint (plain: the dcp.async_save call with "
            "get_state_dict; Stanchion: the manifest's fingerprint, CheckpointManager.save and the wait for "
            "the staging copy before the next optimizer step), median over the rounds, rank 0",
            "window_excess_s: the checkpoint step and the next --window steps, minus as many ordinary steps "
            "of the same round (the background write competes with them for the same cores)",
            "blocked_ratio: Stanchion / plain, of the medians",
        ],
        load_at_start=load_at_start,
        headline=("presets",),
    )

"""One rank of `stanchion bench sdk`: a user's own training loop, plain or under Stanchion's guard.

Run under torchrun as ``python -m diagnostics.bench sdk-worker --mode plain|guarded --run-dir DIR``
(diagnostics/bench/__main__.py; the bench builds the command with ``sdk_command`` in
diagnostics/bench/sdk.py). It is written as a user would write it, importing only torch and the
public ``stanchion`` names, nothing of Stanchion's trainer:

- ``plain``: the classic data-parallel loop. ``init_process_group``, the model wrapped in
  ``torch.nn.parallel.DistributedDataParallel`` (gloo on a CPU, NCCL on CUDA; its defaults:
  bucketed all-reduce overlapped with the backward pass, ``no_sync`` on all but the last
  micro-batch), ``(loss / accum).backward()``, ``clip_grad_norm_``, ``optimizer.step()``,
  ``scheduler.step()``, ``zero_grad``, and the loss read every step as a logging loop does.
- ``guarded``: the same program adopting Stanchion the way examples/own_loop.py does:
  ``stanchion.join`` and ``stanchion.guard`` with every protection at its default
  (``Protections()``: replica fingerprints every step, the ring audit every 80 steps, a snapshot
  every 2 steps, the spike and non-finite monitors, the start-up determinism check), the agreed-norm
  gradient clip, the scheduler and the activation RMS registered; checkpoints off unless
  ``--checkpoint-every`` says otherwise. ``--fingerprint-every``, ``--audit-every`` and
  ``--snapshot-every`` override single protections (the bench's extra configurations).

Both modes build the same model from the same seed, read the same deterministic synthetic batches
(a pure function of data index, rank and micro-batch, as the guard requires), and use the same
AdamW, LR schedule, gradient clip, device (``--device``: CUDA where available, as
``stanchion.join`` picks it) and torch settings (``--threads`` torch threads; deterministic
algorithms on: the guard needs them, and the plain loop runs with them too so that the comparison
is of the SDK alone). Each rank times every step with ``time.perf_counter`` from the first line of
the step's body (before its batches are read) to the line after the step is applied (plain: after
``zero_grad`` and the loss read; guarded: after the ``with guard.step()`` block and
``guard.maybe_checkpoint()``) and appends ``{"step", "step_time_s", "loss"}`` to
``RUN_DIR/ranks/rank-NNNNN/progress.jsonl``, where the benchmarks' common reader looks
(diagnostics/bench/common.py ``read_step_times``). The guard's own records go under
``RUN_DIR/stanchion/``. Rank 0 also writes ``RUN_DIR/worker.json`` (the model's size, the device
and, when guarded, the protections in force and the guard's counters).

**The default model size** (``--dim 32 --hidden 512 --layers 4 --batch-size 512 --accum 2``: an
MLP language model over a 32-token context, 1.45M parameters, 1,024 sequences per rank per
optimizer step) takes about 0.1 s per step on one CPU thread. The guard's costs are per step (the
agreement all-gather, the progress record) and per parameter (fingerprints of parameters and AdamW
state every step, the flat-buffer gradient all-reduce, per-layer gradient norms, a snapshot's
host copy every 2 steps), so what they cost depends on how much compute a step does per parameter: a toy step of a few
milliseconds says nothing about a real one. This size does 6 x 1,024 FLOPs per parameter per rank
and step, the same as the trainer's ``tiny`` preset in `bench trainer` (2,048 tokens per step over
2 ranks). Real jobs do far more (GPT-2 124M with 0.5M-token batches over 8 ranks: 64k tokens per rank
and step), so this size errs on the side of showing the guard's cost. ``--batch-size`` and the
other size flags move it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # tokens of the synthetic language
CONTEXT = 32  # tokens the model sees to predict the next one


class MlpLM(nn.Module):
    """Next-token model: embeddings of the context, ``layers`` linear layers with GELU, a head."""

    def __init__(self, dim: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        blocks: list[nn.Module] = [nn.Linear(CONTEXT * dim, hidden), nn.GELU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.GELU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens).flatten(1)))


def batch_at(
    seed: int, batch_size: int, index: int, rank: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic synthetic batch: a pure function of (data index, rank, micro-batch). The
    target is a fixed function of the context, so there is something to learn."""
    key = hashlib.sha256(f"{seed}/{index}/{rank}/{micro}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    x = torch.randint(VOCAB, (batch_size, CONTEXT), generator=g)
    y = (x[:, -1] + x[:, 0]) % VOCAB
    return x, y


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """The LR factor of a step (a LambdaLR function)."""

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diagnostics.bench sdk-worker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mode", choices=("plain", "guarded"), required=True)
    p.add_argument(
        "--run-dir",
        required=True,
        help="step times under RUN_DIR/ranks/, the guard's files under RUN_DIR/stanchion/",
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (fixes the LR schedule)")
    p.add_argument("--dim", type=int, default=32, help="embedding width per context token")
    p.add_argument("--hidden", type=int, default=512, help="width of the hidden layers")
    p.add_argument("--layers", type=int, default=4, help="linear layers before the head (>= 1)")
    p.add_argument("--batch-size", type=int, default=512, help="sequences per rank per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA where available"
    )
    p.add_argument("--checkpoint-every", type=int, default=0, help="guarded: DCP checkpoints (0: off)")
    for name in ("fingerprint-every", "audit-every", "snapshot-every"):
        p.add_argument(
            f"--{name}",
            type=int,
            default=None,
            help="guarded: override this protection (default: its default)",
        )
    return p


def protection_overrides(args: argparse.Namespace) -> dict[str, int]:
    keys = ("fingerprint_every", "audit_every", "snapshot_every")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


class StepLog:
    """This rank's step times, one JSON line per step (written outside the timed region)."""

    def __init__(self, run_dir: Path, rank: int):
        path = run_dir / "ranks" / f"rank-{rank:05d}" / "progress.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a")

    def write(self, step: int, seconds: float, loss: float | None) -> None:
        self.f.write(json.dumps({"step": step, "step_time_s": seconds, "loss": loss}) + "\n")

    def close(self) -> None:
        self.f.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(None if argv is None else list(argv))
    if args.layers < 1 or args.accum < 1 or args.steps < 1:
        raise SystemExit("--layers, --accum and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    model = MlpLM(args.dim, args.hidden, args.layers)  # built first: the same weights in both modes
    run_dir = Path(args.run_dir)
    run = run_plain if args.mode == "plain" else run_guarded
    info = run(args, model, run_dir)
    if info is not None:
        info.update(mode=args.mode, params=sum(p.numel() for p in model.parameters()))
        (run_dir / "worker.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return 0


def plain_device(kind: str) -> torch.device:
    """The device of this rank, as ``stanchion.join(device=kind)`` picks it for the guarded loop."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def run_plain(args: argparse.Namespace, model: nn.Module, run_dir: Path) -> dict[str, Any] | None:
    from torch.nn.parallel import DistributedDataParallel

    device = plain_device(args.device)
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    model.to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    out = StepLog(run_dir, rank)
    for index in range(args.steps):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.accum):
            x, y = batch_at(args.seed, args.batch_size, index, rank, micro)
            batch = x.to(device), y.to(device)
            sync = ddp.no_sync() if micro < args.accum - 1 else contextlib.nullcontext()
            with sync:  # one all-reduce per step, on the last micro-batch
                loss = loss_fn(ddp, batch)
                (loss / args.accum).backward()
            loss_sum += loss.detach()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss_sum) / args.accum
        seconds = time.perf_counter() - t0
        out.write(index + 1, seconds, loss_value)
    out.close()
    dist.barrier()
    dist.destroy_process_group()
    return {"world_size": world, "device": str(device)} if rank == 0 else None


def run_guarded(args: argparse.Namespace, model: nn.Module, run_dir: Path) -> dict[str, Any] | None:
    import stanchion

    rt = stanchion.join(run_dir=run_dir / "stanchion", seed=args.seed, device=args.device)
    model.to(rt.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    protections = stanchion.Protections(**protection_overrides(args))

    def batch(index: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch_at(args.seed, args.batch_size, index, rank, micro)
        return x.to(rt.device), y.to(rt.device)

    guard = stanchion.guard(
        rt,
        model,
        optimizer,
        steps=args.steps,
        schedulers=[scheduler],
        batch_at=batch,
        loss_fn=loss_fn,
        protections=protections,
        checkpoint_every=args.checkpoint_every,
        grad_clip=args.grad_clip,
        tokens_per_step=args.batch_size * args.accum * rt.world_size * CONTEXT,
        activations=[model.body],
    )
    rank, world = rt.rank, rt.world_size
    out = StepLog(run_dir, rank)
    for _ in guard:
        t0 = time.perf_counter()
        with guard.step() as s:
            for micro in range(args.accum):
                s.backward(loss_fn(model, batch(s.data_index, rank, micro)), accum=args.accum)
        guard.maybe_checkpoint()
        seconds = time.perf_counter() - t0
        out.write(s.number, seconds, s.loss)
    out.close()
    outcome = guard.finish()
    if outcome != "finished":
        raise SystemExit(f"the guarded loop ended {outcome!r}, not 'finished'")
    if rank != 0:
        return None
    return {
        "world_size": world,
        "device": str(rt.device),
        "protections": asdict(protections),
        "checkpoint_every": args.checkpoint_every,
        "counters": dict(guard.counters),
    }


if __name__ == "__main__":
    raise SystemExit(main())

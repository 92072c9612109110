"""A test's SDK program: examples/own_loop.py's model and data with protections chosen by flags, so
a test can run the guard under torchrun with, e.g., in-place rollback on a fingerprint mismatch.

    torchrun --standalone --nproc-per-node 2 tests/programs/guarded.py --run-dir D --steps 40 \
        --protections '{"on_mismatch": "rollback"}'

Prints one JSON line on rank 0 at the end: outcome, step, fingerprint, per-step committed flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from own_loop import CONTEXT, MarkovText, TinyLM  # noqa: E402 - the example's model and data

import stanchion  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--protections", default="{}")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--sync-checkpoints", action="store_true", help="commit each before the next step")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(5)
    model = TinyLM(dim=8, hidden=32)
    data = MarkovText(5, 8)
    rt = stanchion.join(run_dir=args.run_dir, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    guard = stanchion.guard(
        rt,
        model,
        opt,
        steps=args.steps,
        schedulers=[sched],
        batch_at=data.batch,
        loss_fn=loss_fn,
        protections=stanchion.Protections(**json.loads(args.protections)),
        checkpoint_every=args.checkpoint_every,
        async_checkpoint=not args.sync_checkpoints,
        tokens_per_step=8 * CONTEXT * rt.world_size,
    )
    committed = {}
    for _ in guard:
        with guard.step() as s:
            s.backward(loss_fn(model, data.batch(s.data_index, rt.rank, 0)))
        committed[s.number] = s.committed
        guard.maybe_checkpoint()
    outcome = guard.finish()
    if rt.is_main:
        print(
            json.dumps(
                {
                    "outcome": outcome,
                    "step": guard.cursor.step,
                    "fingerprint": guard.final_fingerprint,
                    "committed": committed,
                    "lr": opt.param_groups[0]["lr"],
                    "last_epoch": sched.last_epoch,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

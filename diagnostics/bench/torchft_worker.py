"""One replica group of the torchft peer in `stanchion bench recovery`: Stanchion's trainer job,
made fault tolerant by torchft instead of Stanchion.

Run as ``python -m diagnostics.bench.torchft_worker --replica-id N --run-dir DIR --data DATA
--steps S --lighthouse http://127.0.0.1:PORT [--preset tiny] [--set key=value ...]``, one process
per replica group, beside a running ``torchft_lighthouse`` (torchft's Rust quorum server). Each
process is a replica group of ONE rank; the groups of a job find each other through the lighthouse
and all-reduce gradients over a reconfigurable gloo process group. A supervisor (the benchmark's
driver, playing the part torchrun's ``--max-restarts`` plays) restarts a replica that dies; the
restarted process joins the next quorum and heals from a live replica over HTTP (torchft's
``HTTPTransport``: the live replica serves its model and optimizer state, the new one downloads it).

What it trains is exactly what Stanchion's trainer trains for the same preset and ``--set``
overrides, built by the trainer's own code: the config (``trainer.cli.resolve_config``), the GPT,
its initial weights from the same seed and the AdamW with its explicit initial state
(``trainer.loop.Trainer``'s constructor, which joins nothing), the LR schedule (``lr_at`` of the
step), the global-norm gradient clip (``optim.grad_clip``) and the batches (``get_batch``): replica N
reads the micro-batches rank N of a ``--replicas``-rank trainer run reads at the same step, so
with every replica alive the job is the trainer's job, with torchft's averaging in place of the
trainer's. torchft's semantics differ from Stanchion's where a replica is missing: the live replicas
average only their own gradients (torchft's default ``WorldSizeMode.DYNAMIC``), so the global batch
shrinks instead of being kept by more gradient accumulation.

The torchft wiring is the one its README and ``train_ddp.py`` show: a ``TCPStore`` for the group's
own rendezvous (this process hosts it: the group has one rank), ``Manager(pg=ProcessGroupGloo(...),
min_replica_size=1, load_state_dict=..., state_dict=..., replica_id=..., ...)``,
``torchft.DistributedDataParallel(manager, model)`` (its comm hook all-reduces each gradient bucket
through the manager) and ``torchft.OptimizerWrapper(manager, optimizer)``. Each step:
``optimizer.zero_grad()`` starts the quorum (``--quorum async``, torchft's default, overlaps it with
the forward pass; ``sync`` waits for it and heals before the forward pass), forward and backward,
the LR of ``manager.current_step()``, the clip, and ``optimizer.step()``, which applies the update
only if ``manager.should_commit()`` (every replica's all-reduce succeeded). The state a healing
replica receives is the model's and the optimizer's state dicts plus torchft's own step counter (the
manager adds it); the LR is a pure function of that step, so it is set again after a heal. The
initial weights come from the seed on every replica, so there is no step-0 sync (``init_sync=False``).

Records, where the benchmarks' readers look (``RUN_DIR/ranks/rank-NNNNN/``, N = the replica id):

- ``events.jsonl``: ``healed`` when a quorum brought this process a live replica's state and step;
  ``started`` once its first step's quorum finished and the step was decided (``resumed_step``: the
  step it continues from, after any heal; ``healed``; ``pid``; ``process_start_t``,
  ``manager_ready_t`` and ``first_quorum_t`` time the way there); ``finished`` with the final
  ``fingerprint`` (the same ``stanchion.sdk.fingerprint.state_digest`` of parameters and optimizer
  state Stanchion reports; ``param_fingerprint``: parameters only).
- ``progress.jsonl``: one record per step: ``step`` (``manager.current_step()`` after it),
  ``t`` (``time.time()`` when ``optimizer.step()`` returned), ``t_start`` (at the step's first
  line), ``rank``, ``loss`` (this replica's own micro-batches), ``replicas``
  (``manager.num_participants()``) and ``committed`` (false: torchft threw the step away, e.g.
  an all-reduce failed because a peer died; ``step`` then did not advance).

The job's start waits until every replica's manager is up (``RUN_DIR/torchft/ready-NNNNN``
marks), as torchrun's rendezvous would: the lighthouse runs with ``--min_replicas 1`` so that a
survivor trains on alone, and without the wait the first replica up would start the job alone.

torchft's Rust side (manager server, lighthouse client) logs every quorum and commit at INFO
whatever ``--log-level`` says: run it with ``RUST_LOG=warn`` to keep that off the step's path.

Exits 0 after ``--steps`` committed steps, or at once (a ``too_late`` event) when it was restarted
after the live replicas had already trained every step (``RUN_DIR/torchft/finished-NNNNN``): there
is nobody left to heal from, and training from step 0 alone would be another job.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diagnostics.bench.torchft_worker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--replica-id", type=int, required=True, help="this replica group's number (0-based)")
    p.add_argument("--run-dir", type=Path, required=True, help="records under RUN_DIR/ranks/rank-NNNNN/")
    p.add_argument("--data", type=Path, required=True, help="a directory written by `stanchion data prepare`")
    p.add_argument(
        "--steps", type=int, required=True, help="committed optimizer steps (fixes the LR schedule)"
    )
    p.add_argument(
        "--lighthouse",
        default=None,
        help="the lighthouse's address, e.g. http://127.0.0.1:29510 (default: $TORCHFT_LIGHTHOUSE)",
    )
    p.add_argument("--preset", default="tiny", help="the trainer's preset (trainer/config.py)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one trainer config key, as the trainer's --set (repeatable)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="data-parallel size the global batch is split over: replica N reads rank N's share",
    )
    p.add_argument(
        "--quorum",
        choices=("async", "sync"),
        default="async",
        help="async (torchft's default): the quorum overlaps the forward pass and a healing replica "
        "sits the step out; sync: wait for the quorum and heal before the forward pass",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="Manager timeout (collectives, should_commit, checkpoint transfer) and the gloo group's",
    )
    p.add_argument("--quorum-timeout-s", type=float, default=60.0, help="Manager quorum_timeout")
    p.add_argument("--connect-timeout-s", type=float, default=60.0, help="Manager connect_timeout")
    p.add_argument(
        "--heartbeat-ms", type=int, default=100, help="Manager heartbeat_interval to the lighthouse"
    )
    p.add_argument(
        "--start-timeout-s",
        type=float,
        default=300.0,
        help="the job's start: wait this long for every replica to be up (0: do not wait)",
    )
    p.add_argument("--log-level", default="WARNING", help="torchft's logging level (INFO shows quorums)")
    p.add_argument(
        "--faults",
        type=Path,
        default=None,
        help="a fault schedule (stanchion/sdk/faults.py); its crashes fire as the trainer's do: the "
        "replica SIGKILLs itself as the step begins, once per run",
    )
    return p


class Marks:
    """Empty files under ``RUN_DIR/torchft/``: which replicas have been up, and which finished."""

    def __init__(self, run_dir: Path, rank: int, replicas: int):
        self.dir = run_dir / "torchft"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.replicas = rank, replicas
        self.restarted = self.path("ready", rank).exists()  # this replica was up before

    def path(self, kind: str, rank: int) -> Path:
        return self.dir / f"{kind}-{rank:05d}"

    def ready(self) -> None:
        self.path("ready", self.rank).touch()

    def finished(self) -> None:
        self.path("finished", self.rank).touch()

    def job_over(self) -> bool:
        """Another replica trained every step already."""
        return any(self.path("finished", r).exists() for r in range(self.replicas) if r != self.rank)

    def start_barrier(self, timeout_s: float) -> None:
        """The job's start, as torchrun's rendezvous starts one: wait until every replica's manager
        is up (heartbeating to the lighthouse). Without it the first replica up, alone in the
        lighthouse's view, forms a quorum of one and trains on its own (``min_replicas`` is 1 so
        that a survivor goes on alone later). A restarted replica finds every mark there already."""
        self.ready()
        deadline = time.monotonic() + timeout_s
        while not all(self.path("ready", r).exists() for r in range(self.replicas)):
            if time.monotonic() > deadline:
                raise SystemExit(f"not every replica of {self.replicas} was up after {timeout_s:g} s")
            time.sleep(0.01)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(None if argv is None else list(argv))
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [torchft replica {args.replica_id} pid=%(process)d] "
        "%(name)s: %(message)s",
    )
    if not 0 <= args.replica_id < args.replicas:
        raise SystemExit(f"--replica-id {args.replica_id} must be in [0, --replicas={args.replicas})")
    t_process = time.time()

    import torch
    from torch.distributed import TCPStore
    from torchft import DistributedDataParallel, Manager, ProcessGroupGloo
    from torchft.optim import OptimizerWrapper  # exported as torchft.Optimizer

    from stanchion.files import JsonlWriter
    from stanchion.sdk import faults, fingerprint
    from stanchion.vocab import EventKind
    from trainer.cli import resolve_config
    from trainer.data import get_batch
    from trainer.loop import RunOptions, Trainer
    from trainer.optim import lr_at, set_lr

    # The trainer's config, model, initial weights and optimizer, built by the trainer's own code
    # (Trainer's constructor: vocabulary from the data, threads, deterministic algorithms, the
    # GPT from the seed, AdamW with its explicit initial state). It joins no process group.
    cfg_args = argparse.Namespace(
        preset=args.preset,
        config=None,
        sets=args.sets,
        data=args.data,
        steps=args.steps,
        checkpoint_every=0,
        seed=None,
    )
    trainer = Trainer(resolve_config(cfg_args, env={}), RunOptions(run_dir=args.run_dir))
    cfg, model, inner_opt = trainer.cfg, trainer.model, trainer.optimizer
    assert inner_opt is not None, "the torchft peer runs data parallel on the CPU"
    accum = cfg.check_world(args.replicas)  # micro-batches per step, as in a --replicas-rank run
    rank = args.replica_id

    rank_dir = args.run_dir / "ranks" / f"rank-{rank:05d}"
    events = JsonlWriter(rank_dir / "events.jsonl")
    progress = JsonlWriter(rank_dir / "progress.jsonl")

    # Crashes as the trainer fires them (one-shot across restarts: RUN_DIR/faults/ holds the claims),
    # their fault_injected event written before the process dies.
    injector = faults.FaultInjector(
        [f for f in faults.load(args.faults) if f.kind == "crash"] if args.faults else [],
        rank=rank,
        seed=cfg.seed,
        state_dir=args.run_dir / "faults",
        announce=lambda fired: events.write(
            {"event": EventKind.FAULT_INJECTED, "t": time.time(), "rank": rank, **fired}
        ),
    )
    manager: Any = None

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": inner_opt.state_dict()}

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        inner_opt.load_state_dict(sd["optim"])  # brings the sender's param groups, its lr too
        set_lr(inner_opt, lr_at(manager.current_step(), cfg.optim, cfg.steps))

    # The replica group's own store (torchrun would host it; here the group is this one process).
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=args.timeout_s)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        min_replica_size=1,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"stanchion_{rank}",
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,  # None: $TORCHFT_LIGHTHOUSE
        rank=0,
        world_size=1,
        use_async_quorum=args.quorum == "async",
        timeout=timeout,
        quorum_timeout=timedelta(seconds=args.quorum_timeout_s),
        connect_timeout=timedelta(seconds=args.connect_timeout_s),
        heartbeat_interval=timedelta(milliseconds=args.heartbeat_ms),
        init_sync=False,  # every replica builds the same initial weights from the seed
    )
    ddp = DistributedDataParallel(manager, model)
    optimizer = OptimizerWrapper(manager, inner_opt)
    t_ready = time.time()
    marks = Marks(args.run_dir, rank, args.replicas)
    marks.start_barrier(args.start_timeout_s)

    started = False
    uncommitted = 0
    while manager.current_step() < args.steps:
        t_start = time.time()
        before = manager.current_step()
        injector.begin_step(before + 1, model)
        optimizer.zero_grad(set_to_none=True)  # starts the quorum (sync: waits for it, heals)
        # async: the quorum is still running, and a healing replica's batch is thrown away (its
        # gradients are zeroed before the all-reduce); sync: the quorum put us at our step.
        index = before if args.quorum == "async" else manager.current_step()
        loss_sum = 0.0
        for micro in range(accum):
            x, y = get_batch(
                trainer.data,
                seed=cfg.seed,
                step=index,
                dp_rank=rank,
                dp_world=args.replicas,
                micro_step=micro,
                micro_batch_size=cfg.data.micro_batch_size,
                grad_accum=accum,
                seq_len=cfg.data.seq_len,
            )
            sync = ddp.no_sync() if micro < accum - 1 else contextlib.nullcontext()
            with sync:  # one all-reduce per step, on the last micro-batch
                _, loss = ddp(x, y)
                (loss / accum).backward()
            loss_sum += float(loss.detach())
        manager.wait_quorum()  # done already (the all-reduce waited for it): the step is known now
        t_quorum = time.time()
        step_index = manager.current_step()  # after a heal: the live replicas' step
        if not started and marks.restarted and step_index == 0 and marks.job_over():
            # Restarted after the live replicas trained every step: nobody to heal from, and
            # training the job again from step 0 alone would be another job.
            events.write({"event": "too_late", "t": time.time(), "rank": rank, "pid": os.getpid()})
            manager.shutdown(wait=False)
            return 0
        set_lr(inner_opt, lr_at(step_index, cfg.optim, cfg.steps))
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        replicas = manager.num_participants()
        optimizer.step()  # applied only if manager.should_commit()
        t = time.time()
        after = manager.current_step()
        committed = after > step_index
        healed = step_index != before  # the quorum brought a live replica's state and step
        if healed:
            events.write({"event": "healed", "t": t, "rank": rank, "step": step_index, "pid": os.getpid()})
        if not started:
            started = True
            events.write(
                {
                    "event": "started",
                    "t": t,
                    "rank": rank,
                    "resumed_step": step_index,
                    "healed": healed,
                    "pid": os.getpid(),
                    "quorum": args.quorum,
                    "process_start_t": t_process,
                    "manager_ready_t": t_ready,
                    "first_quorum_t": t_quorum,
                }
            )
        if not committed:
            uncommitted += 1
        progress.write(
            {
                "step": after,
                "t": t,
                "t_start": t_start,
                "step_time_s": t - t_start,
                "rank": rank,
                "loss": loss_sum / accum,
                "replicas": replicas,
                "committed": committed,
                # async: the loss of a healing step is of the weights before the heal
                **({"healed": True} if healed else {}),
            }
        )
    events.write(
        {
            "event": "finished",
            "t": time.time(),
            "rank": rank,
            "step": manager.current_step(),
            "fingerprint": fingerprint.state_digest(model, inner_opt),
            "param_fingerprint": fingerprint.state_digest(model),
            "uncommitted_steps": uncommitted,
            "batches_committed": manager.batches_committed(),
            "pid": os.getpid(),
        }
    )
    marks.finished()
    events.close()
    progress.close()
    manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

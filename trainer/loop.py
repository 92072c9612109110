"""The built-in GPT's pretraining loop: the public SDK's first user.

Everything that protects the run (the per-step agreement, non-finite skips, spike detection, replica
fingerprints, the ring audit, snapshots and rollback, skip windows, re-forming in place, healing
from a live peer, checkpoints with a commit marker, the flight recorder) is the guard's
(:mod:`stanchion.sdk.guard`). This module only says what to train: the model, its data, the learning
rate schedule, the micro-steps of one optimizer step, evaluation and sampled text.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import stanchion
from stanchion.sdk.contract import Assignment
from stanchion.sdk.guard import Guard
from stanchion.sdk.parallel import collective
from stanchion.sdk.runtime import Runtime, worker_paths, write_error_file
from trainer.config import TrainConfig, replace, to_dict
from trainer.data import TokenData, eval_batches, get_batch
from trainer.model import GPT
from trainer.optim import build_optimizer, lr_at, reset_state, set_lr
from trainer.progress import ProgressDisplay

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    run_dir: Path
    faults: Path | None = None  # a fault-injection schedule file (chaos runs)
    resume: str = "auto"  # "auto" (newest good checkpoint), "none", or a checkpoint path
    first_assignment: Assignment | None = None  # agent-managed: the generation to join first
    sample_lines: int = 0
    collective_timeout_s: float = 300.0


class Trainer:
    def __init__(self, cfg: TrainConfig, opts: RunOptions):
        self.opts = opts
        self.data = TokenData(cfg.data.path)
        if cfg.model.vocab_size == 0:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=self.data.vocab_size))
        elif cfg.model.vocab_size < self.data.vocab_size:
            raise ValueError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({self.data.vocab_size}); set it to 0 to take the data's"
            )
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Build the model now, before any group exists: a standby rank is warm when it is called.
        # On the meta device, then materialised and initialised once: building it directly would
        # draw every parameter twice more (the modules' default init, then GPT's own), on one thread.
        with torch.device("meta"):
            self.model = GPT(cfg.model)
        self.model.to_empty(device="cpu")
        self.model.init_weights(cfg.seed)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        # The optimizer with its explicit initial state too (one zero-gradient step: tens of seconds at
        # a billion parameters), where its parameters are final already: data parallel on the CPU.
        # On a GPU the model moves to its device after join(), and FSDP shards it there.
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        self.optimizer: torch.optim.Optimizer | None = None
        if cfg.parallel == "ddp" and on_cpu:
            self.optimizer = build_optimizer(self.model, cfg.optim, device_type="cpu")
        self.train_model: torch.nn.Module = self.model  # what runs forward (compiled, FSDP-wrapped)
        self.rt: Runtime | None = None
        self.guard: Guard | None = None

    # What a run's summary and tests read.
    @property
    def cursor(self) -> Any:
        return self.guard.cursor if self.guard else None

    @property
    def counters(self) -> dict[str, int]:
        return self.guard.counters if self.guard else {}

    @property
    def final_val_loss(self) -> float | None:
        return self.guard.final_val_loss if self.guard else None

    @property
    def fault_hooks(self) -> Any:
        return self.rt.fault_hooks if self.rt else None

    @property
    def is_main(self) -> bool:
        return self.rt is None or self.rt.topo is None or self.rt.topo.is_main

    def run(self) -> int:
        cfg = self.cfg
        rt = self.rt = stanchion.join(
            run_dir=self.opts.run_dir,
            device=cfg.device,
            seed=cfg.seed,
            collective_timeout_s=self.opts.collective_timeout_s,
            validate=cfg.check_world,
            assignment=self.opts.first_assignment,
            faults=self.opts.faults,
            flight_records=cfg.integrity.flight_records,
        )
        self.model.to(rt.device)
        mesh = self._shard(rt) if cfg.parallel == "fsdp" else None
        if cfg.compile:  # the same module underneath: state dicts and fingerprints are unchanged
            self.train_model = torch.compile(self.train_model)
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model, cfg.optim, device_type=rt.device.type)
        if rt.is_main:
            log.info("resolved config: %s", json.dumps(to_dict(cfg), sort_keys=True))
        guard = self.guard = stanchion.guard(
            rt,
            self.model,
            self.optimizer,
            steps=cfg.steps,
            batch_at=self.batch,
            loss_fn=self.loss,
            evaluate=self.evaluate,
            eval_every=cfg.eval_every,
            mesh=mesh,
            replicate_dim="replicate" if mesh is not None and cfg.hsdp_replicate > 1 else None,
            protections=cfg.integrity,
            checkpoint_every=cfg.checkpoint_every,
            keep_checkpoints=cfg.keep_checkpoints,
            async_checkpoint=cfg.async_checkpoint,
            grad_clip=cfg.optim.grad_clip,
            tokens_per_step=cfg.data.global_batch_size * cfg.data.seq_len,
            flops_per_token=self.model.flops_per_token(cfg.data.seq_len),
            layer_groups=self.model.layer_groups(),
            activations=list(self.model.blocks),
            initial_state=self._initial_state,
            config=to_dict(cfg),
            resume=self.opts.resume,
            precision=self.precision,
        )
        display = ProgressDisplay(cfg.steps, guard.tokens_per_step) if rt.is_main else None
        for index in guard:
            with guard.step() as s:
                set_lr(self.optimizer, lr_at(index, cfg.optim, cfg.steps))
                accum = cfg.data.grad_accum(rt.world_size)
                for micro in range(accum):
                    s.backward(self.loss(self.model, self.batch(s.data_index, rt.rank, micro)), accum=accum)
            if display is not None and s.loss is not None:  # the step was agreed (applied or skipped)
                display.update(s.number, s.loss)
            guard.maybe_checkpoint()
        if display is not None:
            display.close()
        if guard.outcome == "finished" and self.opts.sample_lines:
            self.print_samples(self.opts.sample_lines)
        guard.finish()
        return 0

    def _shard(self, rt: Runtime) -> Any:
        return shard_gpt(
            self.model, rt.device.type, rt.world_size, self.cfg.hsdp_replicate, self.cfg.precision
        )

    def _initial_state(self) -> None:
        """A used process told to start over: identical to a fresh one."""
        self.model.init_weights(self.cfg.seed)
        # The explicit initial state build_optimizer made, not an empty one that whatever touches
        # it first (a checkpoint's get_state_dict) would fill in its own way.
        reset_state(self.optimizer)

    # ------------------------------------------------------------------------------------------
    # What one micro-step computes (the guard's batch_at and loss_fn, for its audit too)
    def batch(self, data_index: int, dp_rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, rt = self.cfg, self.rt
        x, y = get_batch(
            self.data,
            seed=cfg.seed,
            step=data_index,  # skipped windows are already counted in the data index
            dp_rank=dp_rank,
            dp_world=rt.world_size,
            micro_step=micro,
            micro_batch_size=cfg.data.micro_batch_size,
            grad_accum=cfg.data.grad_accum(rt.world_size),
            seq_len=cfg.data.seq_len,
        )
        return x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)

    def loss(self, _model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            _, loss = self.train_model(*batch)
        return loss

    @property
    def precision(self) -> str:
        """What the forward and backward passes compute in: bf16 through FSDP's mixed-precision
        policy (any device), or through autocast under DDP (CUDA only); fp32 otherwise."""
        bf16 = self.cfg.precision == "bf16" and (self.cfg.parallel == "fsdp" or self.rt.device.type == "cuda")
        return "bf16" if bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16" and self.cfg.parallel == "ddp":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self) -> float:
        cfg, rt = self.cfg, self.rt
        batches = eval_batches(
            self.data,
            seed=cfg.seed,
            n_batches=cfg.eval_batches,
            batch_size=cfg.data.micro_batch_size,
            seq_len=cfg.data.seq_len,
        )
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)
        self.train_model.eval()
        # Every rank runs the same number of forwards (FSDP needs all ranks in each one); a rank
        # past the end evaluates batch 0 with weight 0.
        per_rank = -(-len(batches) // rt.world_size)
        with torch.no_grad():
            for j in range(per_rank):
                i = rt.rank + j * rt.world_size
                x, y = batches[i] if i < len(batches) else batches[0]
                with self.autocast():
                    _, loss = self.train_model(x.to(rt.device), y.to(rt.device))
                weight = 1.0 if i < len(batches) else 0.0
                total += torch.tensor([float(loss) * weight, weight], dtype=torch.float64, device=rt.device)
        self.train_model.train()
        with collective("evaluation all-reduce"):
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def print_samples(self, n: int) -> None:
        rt = self.rt
        tok = self.data.tokenizer()
        gen = torch.Generator(device=rt.device).manual_seed(self.cfg.seed)
        start = torch.full((n, 1), self.data.eot_id, dtype=torch.long)
        # Every rank generates (FSDP needs all of them in each forward); rank 0 prints.
        out = self.model.generate(
            start.to(rt.device), max_new_tokens=64, temperature=0.8, top_k=40, generator=gen
        )
        if not rt.is_main:
            return
        for row in out.tolist():
            text = tok.decode(row[1:]).replace("\n", " ").strip()
            print(f"sample: {text}", flush=True)

    def write_error(self, exc: BaseException) -> None:
        """The error file the agent reads to classify a crash (before joining too)."""
        if self.rt is not None:
            self.rt.write_error(exc)
        else:
            write_error_file(worker_paths(self.opts.run_dir).error, exc)


def shard_gpt(model: GPT, device_type: str, world_size: int, replicate: int, precision: str) -> Any:
    """Shard ``model`` with FSDP2 (``fully_shard`` each block, then the root) on a mesh of
    ``world_size`` ranks: 1-D ("shard",), or HSDP ("replicate", "shard") with ``replicate`` replica
    groups. Returns the mesh. The trainer and the plain FSDP2 baseline of `bench trainer` shard the
    same way."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if replicate > 1:
        mesh = init_device_mesh(
            device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    # bf16 under FSDP: FSDP2's mixed precision (parameters gathered and computed in bf16,
    # gradients reduced in fp32 into fp32 master weights), on any device; see Trainer.precision.
    mp = {}
    if precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **mp)
    fully_shard(model, mesh=mesh, **mp)
    return mesh

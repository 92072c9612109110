"""What to train: the job spec of one pretraining run, as frozen, validated dataclasses.

Layering: preset < TOML file (``--config``) < ``--set key=value``. The resolved config is logged
once and stored in every checkpoint manifest. Pure standard library: the coordinator validates job
specs with it without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stanchion import settings
from stanchion.sdk.protections import Protections
from stanchion.settings import ConfigError, require


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the prepared data's metadata
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # grouped-query attention: 1 = multi-query, n_head = multi-head
    d_model: int = 128
    d_ff: int = 0  # 0: 4*d_model for GELU, the nearest multiple of 64 above 8/3*d_model for SwiGLU
    max_seq_len: int = 128
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    parallel_block: bool = False  # PaLM/GPT-J: x + attn(norm(x)) + mlp(norm(x))
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    bias: bool = False
    z_loss: float = 0.0  # PaLM uses 1e-4; 0 disables
    init_std: float = 0.02

    def __post_init__(self) -> None:
        require(self.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the data)")
        for key in ("n_layer", "n_head", "n_kv_head", "d_model", "max_seq_len"):
            require(getattr(self, key) > 0, f"model.{key}", "must be > 0")
        require(
            self.d_model % self.n_head == 0,
            "model.d_model",
            f"{self.d_model} is not divisible by model.n_head={self.n_head}",
        )
        require(
            (self.d_model // self.n_head) % 2 == 0,
            "model.n_head",
            "head size must be even for rotary embeddings",
        )
        require(
            self.n_head % self.n_kv_head == 0, "model.n_kv_head", f"must divide model.n_head={self.n_head}"
        )
        require(self.d_ff >= 0, "model.d_ff", "must be >= 0 (0 = default)")
        require(self.z_loss >= 0, "model.z_loss", "must be >= 0")
        require(self.init_std > 0, "model.init_std", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * -(-(8 * self.d_model // 3) // 64)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a directory written by `stanchion data prepare`
    seq_len: int = 128
    micro_batch_size: int = 8  # sequences per rank per micro-step
    global_batch_size: int = 16  # sequences per optimizer step, all data-parallel ranks together

    def __post_init__(self) -> None:
        require(self.seq_len > 0, "data.seq_len", "must be > 0")
        require(self.micro_batch_size > 0, "data.micro_batch_size", "must be > 0")
        require(self.global_batch_size > 0, "data.global_batch_size", "must be > 0")
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "data.global_batch_size",
            f"{self.global_batch_size} is not a multiple of data.micro_batch_size={self.micro_batch_size}",
        )

    def grad_accum(self, dp_world: int) -> int:
        """Micro-steps per optimizer step at this data-parallel size; the global batch stays fixed."""
        per_step = self.micro_batch_size * dp_world
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"data.global_batch_size: {self.global_batch_size} sequences do not divide over "
                f"{dp_world} data-parallel ranks x data.micro_batch_size={self.micro_batch_size}; "
                f"choose a global batch that is a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1  # GPT-3; never applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip by global norm; 0 disables
    schedule: Literal["cosine", "linear", "plateau_linear", "constant"] = "cosine"
    warmup_steps: int = 20
    decay_start_fraction: float = 0.8  # plateau_linear: constant until this fraction of the run

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", "must be > 0")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be between 0 and optim.lr")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        require(math.isfinite(self.lr), "optim.lr", "must be finite")
        require(self.eps > 0, "optim.eps", "must be > 0")
        require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(0 <= self.decay_start_fraction <= 1, "optim.decay_start_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    seed: int = 1337
    steps: int = 200  # total optimizer steps of the run; fixes the LR schedule
    checkpoint_every: int = 50  # 0 disables periodic checkpoints
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    parallel: Literal["ddp", "fsdp"] = "ddp"
    hsdp_replicate: int = 1  # fsdp only: replica groups (HSDP); shards per group = world / replicate
    # bf16: under FSDP, FSDP2's mixed precision (bf16 compute, fp32 reduction and master weights) on
    # any device; under DDP, autocast on CUDA only (fp32 on a CPU)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    # Recompute each block's activations in the backward pass instead of keeping them: less memory
    # for about one more forward pass of compute; the gradients are bit-identical.
    activation_checkpointing: bool = False
    threads: int = 1  # torch intra-op threads per rank on CPU, fixed so results are reproducible
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    integrity: Protections = field(default_factory=Protections)

    def __post_init__(self) -> None:
        require(self.steps > 0, "steps", "must be > 0")
        require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 disables)")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.eval_every >= 0, "eval_every", "must be >= 0")
        require(self.eval_batches > 0, "eval_batches", "must be > 0")
        require(self.hsdp_replicate >= 1, "hsdp_replicate", "must be >= 1")
        require(self.threads >= 1, "threads", "must be >= 1")
        require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        require(
            self.optim.warmup_steps <= self.steps,
            "optim.warmup_steps",
            f"{self.optim.warmup_steps} exceeds steps={self.steps}: run more steps, or shorten the warm-up "
            f"with --set optim.warmup_steps={self.steps // 4}",
        )

    def check_world(self, world_size: int) -> int:
        """Validate the layout for ``world_size`` ranks before any process group starts.

        Returns the number of gradient-accumulation micro-steps.
        """
        if self.parallel == "fsdp" and world_size % self.hsdp_replicate:
            raise ConfigError(
                f"hsdp_replicate: {self.hsdp_replicate} replica groups do not divide {world_size} ranks"
            )
        return self.data.grad_accum(world_size)

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        return settings.build(TrainConfig, settings.merge(settings.as_dict(self), overrides))


# Presets are data, not code: each is a set of overrides on the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo and tests: about 1M parameters with a 2k vocabulary.
    "tiny": {
        "model": {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 128, "max_seq_len": 128},
        "data": {"seq_len": 128, "micro_batch_size": 8, "global_batch_size": 16},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
    },
    # GPT-2 small shape (124M with the GPT-2 vocabulary), modernised: RoPE, pre-norm, tied embeddings.
    "gpt2-124m": {
        "model": {
            "n_layer": 12,
            "n_head": 12,
            "n_kv_head": 12,
            "d_model": 768,
            "max_seq_len": 1024,
            "norm": "layernorm",
            "mlp": "gelu",
            "bias": True,
            "vocab_size": 50304,
        },
        "data": {"seq_len": 1024, "micro_batch_size": 8, "global_batch_size": 512},
        "optim": {"lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 700},
        "steps": 19073,
        "checkpoint_every": 1000,
    },
    # Llama-style ~1.1B for GPU clusters (TinyLlama-like shape): GQA, SwiGLU, RMSNorm, untied.
    "llama-1b": {
        "model": {
            "n_layer": 22,
            "n_head": 32,
            "n_kv_head": 4,
            "d_model": 2048,
            "d_ff": 5632,
            "max_seq_len": 2048,
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "tie_embeddings": False,
            "vocab_size": 32000,
            "z_loss": 1e-4,
        },
        "data": {"seq_len": 2048, "micro_batch_size": 4, "global_batch_size": 1024},
        "optim": {"lr": 4e-4, "min_lr": 4e-5, "warmup_steps": 2000, "schedule": "cosine"},
        "steps": 100000,
        "checkpoint_every": 500,
        "precision": "bf16",
        "parallel": "fsdp",
    },
}


def resolve(
    preset: str = "tiny", *, toml_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """preset < TOML file < overrides. A TOML file may name its own preset with ``preset = "..."``."""
    file_layer = settings.read_toml(toml_path) if toml_path is not None else {}
    over = dict(overrides or {})
    name = over.get("preset") or file_layer.get("preset") or preset
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    base = settings.merge(PRESETS[name], {"preset": name})
    return settings.build(TrainConfig, settings.merge(base, file_layer, over))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return settings.as_dict(cfg)


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    return settings.build(TrainConfig, data)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)

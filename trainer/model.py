"""A decoder-only transformer in the nanoGPT mould, modernised the way current pretraining runs are.

Pre-normalisation blocks (RMSNorm or LayerNorm), rotary position embeddings, grouped-query attention
through ``scaled_dot_product_attention``, a GELU or SwiGLU MLP, an optional parallel block
(PaLM/GPT-J), tied or untied embeddings and the PaLM z-loss. There is no dropout: single-epoch
pretraining does not use it, and it would add an RNG stream that fingerprints and replays must track.

Layout matters to the rest of the trainer: ``blocks`` is an ``nn.ModuleList`` so FSDP2 can
``fully_shard`` each block, the rotary tables are non-persistent buffers so the state dict holds
parameters only, and ``init_weights(seed)`` draws every weight from a private CPU generator so two
ranks (or two replays) build bitwise-identical models whatever the device and the global RNG.
"""

from __future__ import annotations

import logging
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.config import ModelConfig

log = logging.getLogger(__name__)


def _rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every (position, frequency) pair, in float32 whatever the model's dtype."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float64, device="cpu") / half))
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float64, device="cpu")
    angles = torch.outer(pos, inv_freq)  # (max_seq_len, head_dim/2)
    # float64 then rounded to float32, so positions far along the sequence keep accurate angles.
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + head_dim/2]) by position-dependent angles (GPT-NeoX layout).

    x: (B, heads, T, head_dim); cos, sin: (T, head_dim/2).
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, heads, T, head_dim/2) each; rotate in float32
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)  # back to the autocast dtype so attention runs in bf16 on GPU


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: n_kv_head = 1 is multi-query, = n_head multi-head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head
        self.head_dim = cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, d_model)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa lets SDPA share each kv head across n_head/n_kv_head query heads without
        # materialising repeated k/v; the flag is a config constant, so torch.compile sees no branch.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
        )  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, d_model)
        return self.o_proj(y)


class MLP(nn.Module):
    """GELU (GPT-2: up, gelu, down) or SwiGLU (Llama/PaLM: down(silu(gate(x)) * up(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, ff_dim)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, ff_dim); GPT-2's tanh GELU
        return self.down_proj(h)  # (B, T, d_model)


class Block(nn.Module):
    """Pre-norm block: sequential x + attn(norm1(x)), then + mlp(norm2(.)); or both in parallel."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_block
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            # PaLM/GPT-J: both branches read the same input, so their matmuls can overlap.
            return x + self.attn(self.norm1(x), cos, sin) + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                "model.vocab_size: must be > 0 to build the model (0 means 'take it from the data'; "
                "resolve it from the prepared data's metadata first)"
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.activation_checkpointing = False  # set by the trainer (TrainConfig.activation_checkpointing)
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One tensor, two roles: named_parameters() reports it once, as tok_emb.weight.
            self.lm_head.weight = self.tok_emb.weight
        # Non-persistent: derived from the config, so they stay out of state_dict and checkpoints.
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, head_dim/2)
        if not self.tok_emb.weight.is_meta:  # built on the meta device: init_weights after to_empty
            self.init_weights(0)

    # ---- initialisation -------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from a private generator: the same seed gives bitwise-equal weights.

        Every value is drawn on the CPU in module order and then copied to the parameter's device,
        so the result does not depend on the device, the global RNG or how many ranks there are.
        Also refills the rotary tables and restores the embedding tie, so a model built on the meta
        device and moved with ``to_empty`` is complete after this call.

        Linear and Embedding weights ~ N(0, init_std); the residual output projections (attn.o_proj,
        mlp.down_proj) use init_std / sqrt(2 * n_layer) as GPT-2 does, because each block adds two
        of them to the residual stream. Biases are zero, norm weights one.
        """
        cfg = self.cfg
        if cfg.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            # Module.to_empty (after building on the meta device) gives each module its own new
            # tensor, which silently unties them; tie again before drawing.
            self.lm_head.weight = self.tok_emb.weight
        gen = torch.Generator(device="cpu").manual_seed(seed)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                _fill_normal(module.weight, cfg.init_std, gen)
            elif isinstance(module, nn.Linear):
                if module is self.lm_head and cfg.tie_embeddings:
                    continue  # it is tok_emb.weight, already drawn
                std = residual_std if name.endswith(("attn.o_proj", "mlp.down_proj")) else cfg.init_std
                _fill_normal(module.weight, std, gen)
                if module.bias is not None:
                    _fill(module.bias, 0.0)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                _fill(module.weight, 1.0)
                if getattr(module, "bias", None) is not None:
                    _fill(module.bias, 0.0)
        cos, sin = _rope_tables(cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        log.debug("initialised %d parameters from seed %d", self.num_params(non_embedding=False), seed)

    # ---- forward --------------------------------------------------------------------------------

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) token ids. Returns float32 logits (B, T, vocab) and the loss or None.

        loss = mean cross-entropy + z_loss * mean(logsumexp(logits)^2) (PaLM's z-loss keeps the
        softmax normaliser near 1, i.e. log Z near 0, which keeps bf16 logits from drifting).
        """
        B, T = idx.shape
        if idx.size(1) > self.cfg.max_seq_len:  # a shape check, not a data-dependent branch
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, head_dim/2)
        x = self.tok_emb(idx)  # (B, T, d_model)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # non-reentrant: works under FSDP2 and with forward hooks
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)  # (B, T, d_model)
        x = self.norm_f(x)
        # Upcast before the loss: under bf16 autocast the logits come out in bf16, and softmax
        # over a large vocabulary loses too much precision there.
        logits = self.lm_head(x).float()  # (B, T, vocab)
        if targets is None:
            return logits, None
        flat = logits.view(B * T, -1)  # (B*T, vocab)
        loss = F.cross_entropy(flat, targets.reshape(B * T))
        if self.cfg.z_loss > 0:
            log_z = torch.logsumexp(flat, dim=-1)  # (B*T,)
            loss = loss + self.cfg.z_loss * log_z.pow(2).mean()
        return logits, loss

    # ---- introspection --------------------------------------------------------------------------

    def layer_groups(self) -> dict[str, list[str]]:
        """Bounded per-layer labels ("embed", "block.i", "final_norm", "head" when untied) mapped to
        parameter names as ``self.named_parameters()`` reports them (unwrapped: no DDP ``module.``
        or torch.compile ``_orig_mod.`` prefix). Every parameter appears exactly once; the tied
        lm_head weight is reported under "embed"."""
        groups: dict[str, list[str]] = {"embed": []}
        groups.update({f"block.{i}": [] for i in range(self.cfg.n_layer)})
        groups["final_norm"] = []
        if not self.cfg.tie_embeddings:
            groups["head"] = []
        prefixes = {"tok_emb.": "embed", "norm_f.": "final_norm", "lm_head.": "head"}
        for name, _ in self.named_parameters():
            if name.startswith("blocks."):
                label = "block." + name.split(".", 2)[1]
            else:
                label = next(lbl for pre, lbl in prefixes.items() if name.startswith(pre))
            groups[label].append(name)
        return groups

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each shared tensor counted once. ``non_embedding`` leaves out the token
        embedding table (a lookup, not a matmul); with tied embeddings that table is also the
        lm_head, so the head is then excluded too (nanoGPT excludes only its position table)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6 * N + 12 * n_layer * d_model * seq_len.

        N counts every parameter that takes part in a matmul: the non-embedding parameters plus the
        lm_head's vocab * d_model, which is computed whether or not it is tied to the embedding
        (the embedding lookup itself costs no FLOPs). Norm weights are included; they are a rounding
        error. The second term is attention's QK^T and AV (PaLM appendix B): it scales with the
        number of query heads times head_dim = d_model, so grouped-query attention does not change it.
        """
        cfg = self.cfg
        n_matmul = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n_matmul += cfg.vocab_size * cfg.d_model
        return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.d_model * seq_len

    # ---- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        temperature == 0 picks the most likely token. No KV cache: this is for eyeballing samples
        and evals, not serving. Call ``eval()`` first if the caller cares about mode.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.max_seq_len :]  # (B, <= max_seq_len)
            logits, _ = self(context)
            logits = logits[:, -1, :]  # (B, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def _fill_normal(param: torch.Tensor, std: float, gen: torch.Generator) -> None:
    if param.is_meta:
        return  # nothing to fill; a meta model is initialised after to_empty, so skip the draws
    # device="cpu" explicitly: a `with torch.device("cuda"):` around model building must not move
    # the draws off the CPU generator.
    values = torch.empty(param.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=gen)
    _copy_full(param, values)


def _fill(param: torch.Tensor, value: float) -> None:
    _copy_full(param, torch.full(param.shape, value, dtype=torch.float32, device="cpu"))


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size CPU tensor into ``param``, which may be an FSDP2-sharded DTensor."""
    # A DTensor can only exist once its module is loaded; checking first spares every process that
    # never shards (tests, CPU demo) the import's half second.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is not None and isinstance(param, dtensor_module.DTensor):
        # Every rank drew the same full tensor, so each cuts out its own shard: no communication.
        local = dtensor_module.distribute_tensor(
            full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)

"""GPT: shapes, causality, attention variants, tying, z-loss, deterministic init, introspection."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig, resolve
from trainer.model import GPT

VOCAB = 64


def tiny(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
    return dataclasses.replace(base, **changes)


def tokens(seed: int, B: int = 2, T: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=gen)


def test_zero_vocab_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        GPT(ModelConfig(vocab_size=0))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_forward_shapes_and_finite_loss(norm, mlp, seed):
    model = GPT(tiny(norm=norm, mlp=mlp, bias=norm == "layernorm"))
    idx = tokens(seed)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 12, VOCAB)
    assert logits.dtype == torch.float32
    assert loss.shape == () and torch.isfinite(loss)
    logits, loss = model(idx)
    assert loss is None


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("parallel_block", [False, True])
def test_causal_future_tokens_do_not_change_earlier_logits(parallel_block, seed):
    model = GPT(tiny(parallel_block=parallel_block))
    idx = tokens(seed)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.equal(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])  # multi-query, grouped, multi-head
def test_attention_variants(n_kv_head, seed):
    model = GPT(tiny(n_kv_head=n_kv_head))
    attn = model.blocks[0].attn
    head_dim = 32 // 4
    assert attn.q_proj.weight.shape == (32, 32)
    assert attn.k_proj.weight.shape == (n_kv_head * head_dim, 32)
    assert attn.v_proj.weight.shape == (n_kv_head * head_dim, 32)
    idx = tokens(seed)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 12, VOCAB) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gqa_equals_multi_head_with_repeated_kv_weights(seed):
    """A GQA model computes what an MHA model computes when each kv head's weights are repeated."""
    gqa = GPT(tiny(n_kv_head=2))
    mha = GPT(tiny(n_kv_head=4))
    state = gqa.state_dict()
    for name, value in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (n_kv * hd, d) -> (n_head * hd, d): kv head j serves query heads 2j and 2j+1.
            state[name] = value.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = tokens(seed)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)


def test_tied_and_untied_embeddings():
    tied = GPT(tiny(tie_embeddings=True))
    assert tied.lm_head.weight is tied.tok_emb.weight
    names = [n for n, _ in tied.named_parameters()]
    assert "tok_emb.weight" in names and "lm_head.weight" not in names

    untied = GPT(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert "lm_head.weight" in [n for n, _ in untied.named_parameters()]
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + VOCAB * 32


def test_parallel_block_differs_from_sequential(seed):
    seq = GPT(tiny(parallel_block=False))
    par = GPT(tiny(parallel_block=True))
    par.load_state_dict(seq.state_dict())  # same weights, different wiring
    idx = tokens(seed)
    with torch.no_grad():
        a, _ = seq(idx)
        b, _ = par(idx)
    assert a.shape == b.shape
    assert not torch.allclose(a, b)


def test_z_loss_adds_the_expected_amount(seed):
    z = 1e-2
    plain = GPT(tiny(z_loss=0.0))
    with_z = GPT(tiny(z_loss=z))
    with_z.load_state_dict(plain.state_dict())
    idx = tokens(seed)
    targets = tokens(seed + 1)
    with torch.no_grad():
        logits, ce = plain(idx, targets)
        _, total = with_z(idx, targets)
        # Independent recomputation in float64 from the logits.
        flat = logits.double().reshape(-1, VOCAB)
        expected_ce = F.cross_entropy(flat, targets.reshape(-1))
        log_z = flat.exp().sum(-1).log()
        expected_total = expected_ce + z * (log_z**2).mean()
    torch.testing.assert_close(ce.double(), expected_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), expected_total, rtol=1e-5, atol=1e-6)
    assert total > ce


def test_init_is_bitwise_reproducible_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = GPT(tiny())
    a.init_weights(7)
    torch.manual_seed(2)
    b = GPT(tiny())
    b.init_weights(7)
    c = GPT(tiny())
    c.init_weights(8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.q_proj.weight"], sc["blocks.0.attn.q_proj.weight"])


def test_init_values_follow_the_scheme():
    cfg = tiny(norm="layernorm", bias=True, mlp="gelu", init_std=0.02, n_layer=8, d_model=64)
    model = GPT(cfg)
    model.init_weights(3)
    block = model.blocks[0]
    torch.testing.assert_close(block.norm1.weight, torch.ones(64))
    torch.testing.assert_close(block.norm1.bias, torch.zeros(64))
    torch.testing.assert_close(block.attn.q_proj.bias, torch.zeros(64))
    all_q = torch.cat([b.attn.q_proj.weight.flatten() for b in model.blocks])
    all_o = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks])
    all_down = torch.cat([b.mlp.down_proj.weight.flatten() for b in model.blocks])
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert abs(all_q.std().item() - 0.02) < 0.002
    assert abs(all_o.std().item() - residual_std) < 0.001
    assert abs(all_down.std().item() - residual_std) < 0.001


def test_init_weights_completes_a_model_built_on_meta():
    reference = GPT(tiny())
    reference.init_weights(5)
    with torch.device("meta"):
        model = GPT(tiny())
    model.to_empty(device="cpu")  # unties lm_head from tok_emb; init_weights ties them again
    model.init_weights(5)
    assert model.lm_head.weight is model.tok_emb.weight
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert torch.equal(model.rope_cos, reference.rope_cos)
    idx = tokens(0)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], reference(idx)[0])


def test_state_dict_has_no_rope_buffers():
    model = GPT(tiny())
    keys = set(model.state_dict())
    assert not any("rope" in k for k in keys)
    # state_dict lists a tied tensor under both names; named_parameters() would list it once.
    assert keys == {n for n, _ in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("tie", [True, False])
def test_layer_groups_cover_every_parameter_once(tie):
    model = GPT(tiny(tie_embeddings=tie, n_layer=3))
    groups = model.layer_groups()
    expected_labels = ["embed", "block.0", "block.1", "block.2", "final_norm"] + ([] if tie else ["head"])
    assert list(groups) == expected_labels
    listed = [name for names in groups.values() for name in names]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert len(listed) == len(set(listed))
    assert all(n.startswith("blocks.1.") for n in groups["block.1"])


def test_a_few_steps_on_a_repeated_batch_reduce_the_loss(seed):
    model = GPT(tiny())
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = tokens(seed, B=4, T=16)
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(8):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_tiny_preset_is_small():
    cfg = resolve("tiny", overrides={"model": {"vocab_size": 2048}})
    model = GPT(cfg.model)
    total = model.num_params(non_embedding=False)
    assert total < 2_000_000
    assert model.num_params(non_embedding=True) == total - 2048 * cfg.model.d_model


def test_flops_per_token_counts_the_head_once():
    tied = GPT(tiny(tie_embeddings=True))
    untied = GPT(tiny(tie_embeddings=False))
    n = tied.num_params(non_embedding=True) + VOCAB * 32
    assert tied.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16
    # Untying adds a parameter table, not a matmul: the FLOPs are the same.
    assert untied.flops_per_token(16) == tied.flops_per_token(16)


def test_generate_length_and_determinism():
    model = GPT(tiny(max_seq_len=8))
    model.eval()
    prompt = tokens(0, B=2, T=5)
    a = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 15)  # longer than max_seq_len: the context was cropped
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 3, temperature=0.0)
    assert greedy.shape == (2, 8)


def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    idx = tokens(3)
    grads, calls = [], []
    for recompute in (False, True):
        model = GPT(tiny())
        model.init_weights(0)
        model.activation_checkpointing = recompute
        n = [0]
        block, forward = model.blocks[0], model.blocks[0].forward

        def counted(*args, forward=forward, n=n):
            n[0] += 1
            return forward(*args)

        block.forward = counted  # counts recomputations too (forward hooks do not fire for those)
        _, loss = model(idx, idx)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        calls.append(n[0])
        with torch.no_grad():  # no recomputation without a backward pass to feed
            model(idx)
        calls.append(n[0])
    assert calls == [1, 2, 2, 3]  # kept: one forward; recomputed: again in the backward pass
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])

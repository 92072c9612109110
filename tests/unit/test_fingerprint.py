"""Exact tensor fingerprints and the replica majority vote."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stanchion.sdk.fingerprint import (
    compare_replicas,
    digest,
    fingerprints,
    named_state,
    state_digest,
    tensor_fingerprint,
)

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="bit positions assume little-endian")


def flipped(t: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    """A copy of ``t`` with bit ``bit`` of element ``index`` flipped, through a byte view."""
    out = t.clone().contiguous()
    raw = out.reshape(-1).view(torch.uint8)
    pos = index * out.element_size() + bit // 8  # little-endian: byte 0 holds bits 0..7
    raw[pos] ^= 1 << (bit % 8)
    return out


def model_fingerprint(data: bytes) -> int:
    """The documented definition, from scratch: the wrapping sum of the bytes viewed as the widest of
    int64, int32, int16 (signed) or uint8 that divides the length."""
    width = next(w for w in (8, 4, 2, 1) if len(data) % w == 0)
    signed = width > 1
    total = sum(
        int.from_bytes(data[i : i + width], "little", signed=signed) for i in range(0, len(data), width)
    )
    total &= (1 << 64) - 1
    return total - (1 << 64) if total >= 1 << 63 else total


@pytest.mark.parametrize(
    ("dtype", "bits"), [(torch.float32, 32), (torch.bfloat16, 16), (torch.float64, 64)], ids=str
)
def test_every_single_bit_flip_changes_the_fingerprint(seed, dtype, bits):
    gen = torch.Generator().manual_seed(seed)
    for numel in (1, 3, 8, 17, 64):  # odd and even byte lengths: every integer view is used
        t = torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)
        base = int(tensor_fingerprint(t))
        assert int(tensor_fingerprint(t.clone())) == base
        indices = {0, numel - 1, int(torch.randint(numel, (1,), generator=gen))}
        for index in indices:
            for bit in range(bits):
                changed = flipped(t, index, bit)
                assert int(tensor_fingerprint(changed)) != base, (numel, index, bit)


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=64))
def test_fingerprint_matches_the_documented_definition(data):
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    assert int(tensor_fingerprint(t)) == model_fingerprint(data)


def test_odd_byte_lengths_use_narrow_views():
    u8 = torch.tensor([255, 1, 2], dtype=torch.uint8)  # 3 bytes: summed as unsigned bytes
    assert int(tensor_fingerprint(u8)) == 258
    i16 = torch.tensor([-1, 2, 3], dtype=torch.int16)  # 6 bytes: summed as int16
    assert int(tensor_fingerprint(i16)) == 4
    i16_flipped = i16.clone()
    i16_flipped[0] = 0x7FFF  # -1 with its sign bit cleared
    assert int(tensor_fingerprint(i16_flipped)) != 4
    assert int(tensor_fingerprint(torch.zeros(0))) == 0


def test_equal_tensors_agree_whatever_their_layout(seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(6, 10, generator=gen)
    assert int(tensor_fingerprint(t)) == int(tensor_fingerprint(t.clone()))
    view = t.t()  # not contiguous
    assert int(tensor_fingerprint(view)) == int(tensor_fingerprint(view.contiguous()))
    assert tensor_fingerprint(t).dtype == torch.int64 and tensor_fingerprint(t).dim() == 0


def test_swapping_elements_in_the_same_lane_is_not_seen(seed):
    """A known, documented limit: the fingerprint is a sum, so moving values between positions that
    occupy the same lane of the integer view (here fp32 elements 0 and 2, both the low half of an
    int64 word) leaves it unchanged. Replicas that differ only by such a permutation are not told
    apart; the fingerprint is aimed at bit flips, not at reordering."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(8, generator=gen)
    swapped = t.clone()
    swapped[0], swapped[2] = t[2], t[0]
    assert not torch.equal(swapped, t)
    assert int(tensor_fingerprint(swapped)) == int(tensor_fingerprint(t))


def test_fingerprints_keep_names_and_order():
    a, b = torch.ones(3), torch.zeros(2, dtype=torch.float64)
    names, values = fingerprints([("a", a), ("b", b)])
    assert names == ["a", "b"]
    assert values.tolist() == [int(tensor_fingerprint(a)), 0]
    names, values = fingerprints([])
    assert names == [] and values.shape == (0,) and values.dtype == torch.int64


def rows(*vectors: list[int]) -> dict[int, torch.Tensor]:
    return {r: torch.tensor(v, dtype=torch.int64) for r, v in enumerate(vectors)}


def test_all_replicas_agree():
    c = compare_replicas(rows([1, 2, 3], [1, 2, 3], [1, 2, 3]), names=["a", "b", "c"])
    assert (c.agree, c.suspect_ranks, c.mismatched_tensors) == (True, (), ())
    assert c.reason == "3 replicas agree"


def test_three_replicas_name_the_odd_one_and_its_tensors():
    c = compare_replicas(rows([1, 2, 3, 4], [1, 9, 3, 8], [1, 2, 3, 4]), names=["a", "b", "c", "d"])
    assert not c.agree
    assert c.suspect_ranks == (1,)
    assert c.mismatched_tensors == ("b", "d")
    assert c.reason == "ranks [1] differ from the majority of 2 of 3 replicas"


def test_five_replicas_name_both_odd_ones():
    c = compare_replicas(rows([1], [5], [1], [7], [1]), names=["w"])
    assert (c.agree, c.suspect_ranks, c.mismatched_tensors) == (False, (1, 3), ("w",))


def test_two_replicas_that_disagree_name_nobody():
    c = compare_replicas(rows([1, 2], [1, 3]), names=["a", "b"])
    assert (c.agree, c.suspect_ranks, c.mismatched_tensors) == (False, (), ("b",))
    assert "cannot tell which one is wrong" in c.reason


def test_no_strict_majority_names_nobody():
    c = compare_replicas(rows([1], [2], [1], [2]))
    assert (c.agree, c.suspect_ranks) == (False, ())
    assert c.reason.startswith("replicas disagree with no majority")
    assert "ranks [0, 2]" in c.reason and "ranks [1, 3]" in c.reason
    three_ways = compare_replicas(rows([1], [2], [3]))
    assert (three_ways.agree, three_ways.suspect_ranks) == (False, ())


def test_compare_without_names_reports_no_tensors():
    c = compare_replicas(rows([1], [2], [1]))
    assert (c.suspect_ranks, c.mismatched_tensors) == ((1,), ())


def test_digest_is_stable_and_tells_vectors_apart(seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(-(2**62), 2**62, (16,), generator=gen, dtype=torch.int64)
    d = digest(v)
    assert d == digest(v.clone()) == digest(v.tolist())
    assert len(d) == 16 and int(d, 16) >= 0
    w = v.clone()
    w[5] += 1
    assert digest(w) != d
    assert digest(v[:-1]) != d
    assert digest(torch.flip(v, [0])) != d  # unlike a fingerprint, the digest sees order


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))


def test_named_state_covers_parameters_and_optimizer_state():
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = ["param/0.weight", "param/0.bias", "param/1.weight"]
    assert [n for n, _ in named_state(model, opt)] == params  # no optimizer state before a step
    assert [n for n, _ in named_state(model, None)] == params

    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    state = named_state(model, opt)
    names = [n for n, _ in state]
    assert names == params + [
        f"optim/{p}/{k}"
        for p in ("0.weight", "0.bias", "1.weight")
        for k in ("exp_avg", "exp_avg_sq", "step")
    ]
    by_name = dict(state)
    assert by_name["optim/0.bias/exp_avg"] is opt.state[model[0].bias]["exp_avg"]
    assert by_name["param/1.weight"] is model[1].weight


def test_state_digest_follows_the_optimizer_state():
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    before = state_digest(model, opt)
    assert state_digest(model, opt) == before
    with torch.no_grad():
        opt.state[model[0].weight]["exp_avg_sq"].view(torch.int32)[0] ^= 1
    assert state_digest(model, opt) != before

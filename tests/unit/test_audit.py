"""The ring recomputation audit: digests of gradients, and the verdict that names a rank computing
wrong numbers from which ring edges disagree."""

from __future__ import annotations

import random

import pytest
import torch

from stanchion.sdk.audit import audit_verdict, digest_of, grad_digest


def ring(world: int, bad: set[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """(own, recomputed_next) for a ring where the ranks in ``bad`` compute wrong numbers: each
    micro-batch has a true digest; a bad rank gets its own and its neighbour's wrong, differently."""
    truth = [rng.getrandbits(63) for _ in range(world)]
    wrong = iter(rng.sample(range(1, 2**32), 2 * world))

    def computed(by: int, batch: int) -> int:
        return truth[batch] ^ next(wrong) if by in bad else truth[batch]

    own = [computed(r, r) for r in range(world)]
    recomputed_next = [computed(r, (r + 1) % world) for r in range(world)]
    return own, recomputed_next


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_all_good_ranks_agree(seed, world):
    own, nxt = ring(world, set(), random.Random(seed))
    v = audit_verdict(own, nxt)
    assert (v.agree, v.bad_edges, v.suspect_ranks) == (True, (), ())
    assert v.reason == f"{world} ranks agree on recomputed gradients"


@pytest.mark.parametrize("world", [3, 4, 5])
def test_one_bad_rank_is_named_alone(seed, world):
    rng = random.Random(seed)
    for bad in range(world):
        own, nxt = ring(world, {bad}, rng)
        v = audit_verdict(own, nxt)
        assert not v.agree
        assert v.bad_edges == tuple(sorted({((bad - 1) % world, bad), (bad, (bad + 1) % world)}))
        assert v.suspect_ranks == (bad,)
        assert v.reason == f"rank(s) [{bad}] disagree with both ring neighbours on recomputed gradients"


def test_two_ranks_cannot_tell_which_is_wrong(seed):
    own, nxt = ring(2, {1}, random.Random(seed))
    v = audit_verdict(own, nxt)
    assert (v.agree, v.bad_edges, v.suspect_ranks) == (False, ((0, 1), (1, 0)), ())
    assert "with two, it cannot tell which" in v.reason


@pytest.mark.parametrize(("world", "bad"), [(4, {1, 2}), (5, {1, 2}), (5, {4, 0})])
def test_two_adjacent_bad_ranks_are_both_named(seed, world, bad):
    own, nxt = ring(world, bad, random.Random(seed))
    v = audit_verdict(own, nxt)
    first = next(b for b in bad if (b + 1) % world in bad)  # the pair is (first, first + 1)
    expected_edges = {((first - 1 + k) % world, (first + k) % world) for k in range(3)}
    assert not v.agree
    assert set(v.bad_edges) == expected_edges and len(v.bad_edges) == 3
    assert v.suspect_ranks == tuple(sorted(bad))


def test_one_bad_edge_names_nobody():
    """A single bad edge (one recomputation differs, e.g. a transient in the recomputing rank only)
    cannot single out either end."""
    v = audit_verdict([1, 2, 3, 4], [2, 99, 4, 1])
    assert (v.agree, v.bad_edges, v.suspect_ranks) == (False, ((1, 2),), ())
    assert "no rank can be named" in v.reason


def test_every_edge_bad_names_nobody(seed):
    own, nxt = ring(3, {0, 1}, random.Random(seed))
    v = audit_verdict(own, nxt)
    assert len(v.bad_edges) == 3
    assert 2 not in v.suspect_ranks


def grads(seed: int, shapes=((4, 3), (3,), (2, 2))) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def test_digest_is_equal_for_equal_gradients_and_changes_with_any_one(seed):
    gs = grads(seed)
    base = digest_of(gs)
    assert digest_of([g.clone() for g in gs]) == base
    assert -(2**63) <= base < 2**63
    rng = random.Random(seed)
    for i, g in enumerate(gs):
        for _ in range(8):
            changed = [x.clone() for x in gs]
            index, bit = rng.randrange(g.numel()), rng.randrange(32)
            changed[i].view(-1).view(torch.int32)[index] ^= (1 << bit) if bit < 31 else -(2**31)
            assert digest_of(changed) != base, (i, index, bit)


def test_digest_skips_missing_gradients_and_sees_position():
    g = torch.ones(3)
    assert digest_of([None, None]) == 0
    assert digest_of([g, None]) == digest_of([g])
    assert digest_of([None, g]) != digest_of([g, None])


def test_grad_digest_reads_the_parameters_gradients(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    assert grad_digest(params) == 0
    model(torch.randn(5, 3)).pow(2).sum().backward()
    d = grad_digest(params)
    assert d == digest_of([p.grad for p in params])
    with torch.no_grad():
        params[3].grad[1] = torch.nextafter(params[3].grad[1], torch.tensor(float("inf")))
    assert grad_digest(params) != d

"""The per-step control row packs and unpacks exactly, and the agreement reads the same on every rank."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stanchion.sdk.control import Agreement, Cadence, Control

i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(
    step=st.integers(min_value=0, max_value=2**40),
    loss=st.floats(allow_nan=False) | st.just(math.nan),
    stop=st.booleans(),
    request=st.integers(min_value=0, max_value=2**40),
    gen=st.integers(min_value=-1, max_value=2**40),
    own=i64,
    nxt=i64,
    params=i64,
    state=i64,
)
def test_a_row_round_trips_bit_for_bit(step, loss, stop, request, gen, own, nxt, params, state) -> None:
    row = Control(step, loss, stop, request, gen, own, nxt, params, state)
    back = Control.unpack(row.pack(torch.device("cpu")).tolist())
    assert math.isnan(back.loss) if math.isnan(loss) else back.loss.hex() == loss.hex()
    assert (back.step_index, back.stop, back.request, back.next_generation) == (step, stop, request, gen)
    assert (back.audit_own, back.audit_next, back.param_digest, back.state_digest) == (
        own,
        nxt,
        params,
        state,
    )
    # A loss still on the device (a step starts its agreement before its last backward pass) packs
    # to the same row, the non-finite column included.
    lazy = Control(step, torch.tensor(loss, dtype=torch.float64), stop, request, gen, own, nxt, params, state)
    assert torch.equal(lazy.pack(torch.device("cpu")), row.pack(torch.device("cpu")))


def test_the_agreement_is_what_every_rank_acts_on() -> None:
    rows = (
        Control(4, 2.0, False, 3, -1, param_digest=7, state_digest=11),
        Control(4, math.inf, True, 5, 9, param_digest=7, state_digest=11),
        Control(4, 4.0, False, 5, -1, param_digest=8, state_digest=12),
    )
    a = Agreement(rows)
    assert a.nonfinite_ranks == [1] and a.stop and a.newest_request == 5 and a.newest_generation == 9
    assert a.holders_of(5) == [1, 2] and not a.params_agree()
    assert a.states_agree([0, 1]) and not a.states_agree([0, 1, 2]) and not a.states_agree([1, 2])
    assert Agreement(rows[:1] + rows[2:]).loss == 3.0


def test_ranks_out_of_step_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import stanchion.sdk.control as control

    def gathered(t: torch.Tensor, what: str) -> Callable[[], torch.Tensor]:
        other = t.clone()
        other[0] += 1
        return lambda: torch.stack([t, other])

    monkeypatch.setattr(control, "start_all_gather_rows", gathered)
    with pytest.raises(RuntimeError, match=r"ranks are out of step at step 4: \[3, 4\]"):
        Agreement.gather(Control(3, 1.0, False, 0), torch.device("cpu"))


def test_a_cadence_of_zero_is_never_due() -> None:
    assert [s for s in range(1, 13) if Cadence(4).due(s)] == [4, 8, 12]
    assert not any(Cadence(0).due(s) for s in range(1, 13))

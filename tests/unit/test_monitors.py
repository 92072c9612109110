"""The robust spike detector and per-group gradient norms."""

from __future__ import annotations

import json
import random

import pytest
import torch

from trainer.monitors import SpikeDetector, group_norms, robust_z


def test_robust_z_on_a_known_window():
    # median 3; absolute deviations 2, 1, 0, 1, 97 -> MAD 1; sigma = 1.4826 * MAD
    z, med, mad = robust_z(10.0, [1.0, 2.0, 3.0, 4.0, 100.0])
    assert (med, mad) == (3.0, 1.0)
    assert z == (10.0 - 3.0) / 1.4826
    # An even-length window: median 2.5, deviations 1.5, 0.5, 0.5, 1.5 -> MAD 1.0
    z, med, mad = robust_z(2.5, [4.0, 1.0, 3.0, 2.0])
    assert (z, med, mad) == (0.0, 2.5, 1.0)


def test_a_spike_in_the_history_does_not_drag_the_baseline():
    calm = [1.0, 1.1, 0.9, 1.0, 1.05]
    z_calm = robust_z(5.0, calm)[0]
    assert robust_z(5.0, [*calm, 1000.0, 1000.0])[0] > 0.5 * z_calm


def test_a_flat_history_does_not_divide_by_zero():
    z, med, mad = robust_z(5.01, [5.0, 5.0, 5.0])
    assert (med, mad) == (5.0, 0.0)
    assert z == (5.01 - 5.0) / (5.0 * 1e-3)  # a scale relative to the median
    assert robust_z(5.0, [5.0, 5.0, 5.0])[0] == 0.0
    assert robust_z(-4.0, [-5.0, -5.0, -5.0])[0] == 1.0 / (5.0 * 1e-3)
    assert robust_z(1.0, [0.0, 0.0, 0.0])[0] == 1.0 / 1e-12  # a flat zero history still registers a jump


def detector(**changes) -> SpikeDetector:
    kw = dict(window=10, min_history=5, loss_z=6.0, grad_z=6.0)
    kw.update(changes)
    return SpikeDetector(**kw)


def noisy(rng: random.Random, n: int) -> list[float]:
    return [2.0 + rng.uniform(-0.05, 0.05) for _ in range(n)]


def test_an_upward_spike_is_flagged_after_min_history_not_before(seed):
    rng = random.Random(seed)
    d = detector()
    values = noisy(rng, 4)
    for step, v in enumerate(values, start=1):
        assert d.observe(step, {"loss": v, "grad_norm": v}) == []
    # Only 4 values so far (min_history 5): even a huge value is not judged, and it joins the window.
    assert d.observe(5, {"loss": 50.0, "grad_norm": 2.0}) == []
    assert [v for _, v in d.history["loss"]] == [*values, 50.0]

    d = detector()
    for step, v in enumerate(noisy(rng, 5), start=1):
        d.observe(step, {"loss": v, "grad_norm": v})
    hist = [v for _, v in d.history["loss"]]
    spikes = d.observe(6, {"loss": 50.0, "grad_norm": 2.0})
    assert len(spikes) == 1
    s = spikes[0]
    z, med, mad = robust_z(50.0, hist)
    assert (s.metric, s.value, s.median, s.mad, s.z, s.threshold, s.window) == (
        "loss",
        50.0,
        med,
        mad,
        z,
        6.0,
        (1, 5),
    )


def test_downward_moves_are_not_spikes(seed):
    d = detector()
    for step, v in enumerate(noisy(random.Random(seed), 6), start=1):
        d.observe(step, {"loss": v, "grad_norm": v})
    assert d.observe(7, {"loss": -100.0, "grad_norm": 0.0}) == []
    assert d.history["loss"][-1] == (7, -100.0)


def test_the_threshold_is_strict():
    d = detector()
    for step, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        d.observe(step, {"loss": v, "grad_norm": v})
    z = robust_z(20.0, [1.0, 2.0, 3.0, 4.0, 5.0])[0]
    d.thresholds["loss"] = z
    assert d.observe(6, {"loss": 20.0, "grad_norm": 3.0}) == []  # z == threshold: not a spike
    d.history["loss"].pop()
    d.thresholds["loss"] = float(torch.nextafter(torch.tensor(z, dtype=torch.float64), torch.tensor(0.0)))
    assert [s.metric for s in d.observe(6, {"loss": 20.0, "grad_norm": 3.0})] == ["loss"]


def test_non_finite_values_are_ignored(seed):
    d = detector()
    for step, v in enumerate(noisy(random.Random(seed), 6), start=1):
        d.observe(step, {"loss": v, "grad_norm": v})
    before = {m: list(h) for m, h in d.history.items()}
    assert d.observe(7, {"loss": float("nan"), "grad_norm": float("inf")}) == []
    assert {m: list(h) for m, h in d.history.items()} == before


def test_a_run_of_spikes_is_measured_against_the_healthy_baseline(seed):
    d = detector()
    for step, v in enumerate(noisy(random.Random(seed), 8), start=1):
        d.observe(step, {"loss": v, "grad_norm": v})
    baseline = list(d.history["loss"])
    for step in range(9, 30):  # many more spikes than the window holds
        spikes = d.observe(step, {"loss": 40.0, "grad_norm": 2.0})
        assert [s.metric for s in spikes] == ["loss"]
        assert spikes[0].window == (1, 8)
    assert list(d.history["loss"]) == baseline
    assert len(d.history["grad_norm"]) == 10  # the healthy metric kept filling its window


def test_both_metrics_can_spike_at_once(seed):
    d = detector(grad_z=3.0)
    for step, v in enumerate(noisy(random.Random(seed), 6), start=1):
        d.observe(step, {"loss": v, "grad_norm": v})
    spikes = d.observe(7, {"loss": 30.0, "grad_norm": 30.0})
    assert [(s.metric, s.threshold) for s in spikes] == [("loss", 6.0), ("grad_norm", 3.0)]


def test_forget_after_drops_newer_observations(seed):
    d = detector()
    for step, v in enumerate(noisy(random.Random(seed), 9), start=1):
        d.observe(step, {"loss": v, "grad_norm": v})
    d.forget_after(4)
    assert [s for s, _ in d.history["loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in d.history["grad_norm"]] == [1, 2, 3, 4]
    d.forget_after(0)
    assert len(d.history["loss"]) == 0


def test_state_round_trips_through_json(seed):
    rng = random.Random(seed)
    d = detector()
    for step, v in enumerate(noisy(rng, 13), start=1):
        d.observe(step, {"loss": v, "grad_norm": v + 1.0})
    state = json.loads(json.dumps(d.state()))
    e = detector()
    e.load_state(state)
    assert e.state() == d.state()
    assert e.history == d.history and e.history["loss"].maxlen == 10
    probe = {"loss": 9.0, "grad_norm": rng.uniform(2.9, 3.1)}
    assert e.observe(14, probe) == d.observe(14, probe)
    e.load_state({"loss": [], "unknown": [[1, 2.0]]})  # unknown metrics are ignored
    assert len(e.history["loss"]) == 0 and set(e.history) == {"loss", "grad_norm"}


def test_group_norms_are_squared_l2_norms_per_group(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    gen = torch.Generator().manual_seed(seed)
    # Small integer gradients: every square and every partial sum is exact in float32, so the
    # result must equal the integer computation whatever the summation order.
    for p in model.parameters():
        p.grad = torch.randint(-8, 9, p.shape, generator=gen).float()
    model[2].weight.grad = None  # a parameter without a gradient counts as zero
    groups = {
        "first": ["0.weight", "0.bias"],
        "rest": ["1.weight", "1.bias", "2.weight", "2.bias"],
        "empty": [],
    }
    sq, labels = group_norms(model, groups)
    params = dict(model.named_parameters())

    def expected(names: list[str]) -> int:
        return sum(
            int(x) ** 2
            for n in names
            if params[n].grad is not None
            for x in params[n].grad.flatten().tolist()
        )

    assert labels == ["first", "rest", "empty"]
    assert sq.dtype == torch.float32 and sq.shape == (3,)
    assert sq.tolist() == [float(expected(groups[k])) for k in labels]


def test_group_norms_accept_low_precision_gradients():
    model = torch.nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    model.weight.grad = torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16)
    sq, labels = group_norms(model, {"all": ["weight"]})
    assert (sq.tolist(), labels, sq.dtype) == ([25.0], ["all"], torch.float32)


@pytest.mark.parametrize("metric", ["loss", "grad_norm"])
def test_each_metric_has_its_own_window(metric):
    d = detector()
    for step in range(1, 7):
        d.observe(step, {"loss": 1.0 + step * 0.01, "grad_norm": 5.0 + step * 0.01})
    other = "grad_norm" if metric == "loss" else "loss"
    values = {metric: 100.0, other: d.history[other][-1][1]}
    assert [s.metric for s in d.observe(7, values)] == [metric]

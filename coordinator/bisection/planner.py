"""Bisection planner: which node groups run the deterministic trial next, or the verdict.

To find a node that silently computes wrong numbers, the coordinator runs one fixed deterministic
trial (seeded model, fixed data, fixed steps, world size ``group_size``) on node groups in parallel
and compares each group's fingerprint trace with a reference. :func:`plan` is a pure function of the
suspects, the results so far and a :class:`BisectConfig`; it returns the next :class:`Round` (groups
to run at once: node-disjoint, exactly ``group_size`` nodes each) or a :class:`Verdict`. Call it
again once every group of the round has reported. No I/O, no clock, no randomness.

Model. Healthy nodes give bit-identical traces whichever of them run the trial. A group holding a
faulty node disagrees with the reference when that node *shows*: always for a deterministic fault
(``p_show=1``); for an intermittent one with probability at least ``p_show`` per trial, independently.

Reference. ``reference_trace``, or the trace of a group made only of ``known_good`` nodes, which the
planner schedules in the first round when it has no reference and enough known-good nodes
("known-good"). Otherwise the trace that a strict majority, and at least two, of the conclusive
groups of one round produced; the earliest such round fixes it ("majority"). Majority mode assumes
that two disjoint groups never produce the same wrong trace, so it needs at least two groups per
round, and three to outvote one bad group. With neither, the verdict says it cannot tell.

Naming. A node is named faulty only if a trial containing it disagreed with the reference and every
other member of that trial is cleared (known-good nodes count as cleared). A trial that failed to run
(no trace) tells nothing: its nodes are planned again, and an undetermined node whose trials failed
more than ``max_retries`` times is reported inconclusive, never faulty.

Clearing. A node is cleared after ``k_d`` agreeing trials in a row, counted since its last
disagreement, where ``d`` is the number of disagreeing trials it was in before and ``k_d`` is the
least k with ``(1 - p_show)**k <= delta / N / 2**(d + 1)`` (N suspects; k_d = 1 when p_show = 1).
Why it is sound: healthy nodes never cause a disagreement, so a verdict is wrong only if a faulty node
got cleared (a healthy node is named only when a faulty co-member was cleared). A faulty node's runs
of agreement start at its first trial or after a disagreement; the run after its d-th disagreement
reaches k_d with probability at most (1 - p)**k_d, however the planner adapts, so it is cleared with
probability at most sum_d delta / N / 2**(d + 1) <= delta / N, and the union over at most N faulty
nodes gives delta. ``Verdict.confidence`` is 1 - (nodes cleared by trials) * sum_d (1 - p)**k_d, at
least 1 - delta; exactly 1.0 for deterministic faults (given the reference).

Groups. Each round tries to test every undetermined node, preferring one suspect per group padded
with known-good and cleared nodes. Short of groups or padding, untested nodes share groups, and the
open members of a disagreeing group are spread over groups with cleared padding (or halved when a
round runs one group); no group holds all open members of a disagreeing group, which would only
disagree again. One deterministic fault costs one round with group_size 1 (given a reference, or
N >= 3 for a majority). With larger groups it costs at most ceil(log2 N) rounds, two for group_size
up to 4, when 2 * group_size known-good nodes can pad; with no padding, group_size 2 keeps that bound
from N = 4. Under intermittent faults, parts of disagreeing groups are kept away from untested nodes
(a show would reset their clearing streaks) and wait for cleared padding, so known-good padding saves
many rounds there.

Limits.
- One group per round (``max_parallel=1``) gives one agree/disagree bit per round. Under the naming
  rule the path where every trial agrees names nobody, so isolating one fault among N needs
  ceil(log2(N + 1)) rounds (one more than ceil(log2 N) when N is a power of two), and only with the
  premise ``at_most_one_fault`` (a disagreement clears everyone outside it by elimination; a node is
  still named only through a trial that contained it). The premise is the caller's: if it is false a
  healthy node can be named, and the planner stops only when disjoint disagreements contradict it.
  Without it, proving the others clean costs up to two more rounds. A trial holds ``group_size``
  suspects at most, so halving needs a group_size near N, and padding nodes.
- Multi-node groups see node-local faults that only show across nodes (a NIC) like any other fault.
  A fault that needs two given nodes together (a link) shows only if they share a group; the planner
  does not search pairs. When a disagreeing group's members all pass without each other, the group is
  reported in ``Verdict.unexplained`` and its members as inconclusive.
- Splitting a group needs padding: with too few known-good or cleared nodes the remaining suspects
  are reported inconclusive, and the reason says so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ReferenceKind = Literal["known-good", "majority", "none"]

_UNLIMITED = 1 << 30


@dataclass(frozen=True)
class BisectConfig:
    group_size: int = 1  # nodes per trial group: the trial's fixed world size
    max_parallel: int | None = None  # groups per round; None: as many as the nodes allow
    p_show: float = 1.0  # lower bound on the chance a faulty node shows in one trial (1.0: deterministic)
    delta: float = 1e-3  # acceptable probability of a wrong verdict
    max_rounds: int = 64
    max_retries: int = 2  # failed trials an undetermined node may have before it is inconclusive
    at_most_one_fault: bool = False  # classic bisection premise; see the module docstring

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size: must be at least 1, got {self.group_size}")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"max_parallel: must be None or at least 1, got {self.max_parallel}")
        if not MIN_P_SHOW <= self.p_show <= 1.0:
            raise ValueError(f"p_show: must be in [{MIN_P_SHOW:g}, 1], got {self.p_show}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta: must be in (0, 1), got {self.delta}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds: must be at least 1, got {self.max_rounds}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: must be at least 0, got {self.max_retries}")


@dataclass(frozen=True)
class TrialResult:
    round: int
    group: tuple[str, ...]  # node ids in the group
    trace: str | None  # the fingerprint trace; None: the trial failed to run


@dataclass(frozen=True)
class Round:
    """The next round: run every group at once, then call :func:`plan` with all their results."""

    index: int  # 1-based
    groups: tuple[tuple[str, ...], ...]
    reason: str


@dataclass(frozen=True)
class Verdict:
    faulty: tuple[str, ...]
    cleared: tuple[str, ...]
    inconclusive: tuple[str, ...]
    rounds: int  # rounds run
    confidence: float  # probability the verdict is right under the model
    reference: ReferenceKind
    reason: str  # one human sentence
    unexplained: tuple[tuple[str, ...], ...] = ()  # disagreeing groups whose members all passed apart


# A fault that shows in fewer than 1 trial in 100 would need thousands of trials per node to clear
# (and at p_show -> 0 the streak's logarithm divides by zero): below this, bisection is the wrong tool.
MIN_P_SHOW = 0.01


def required_streak(p_show: float, delta_node: float, disagreements: int) -> int:
    """Agreeing trials in a row that clear a node after ``disagreements`` disagreeing ones."""
    if p_show >= 1.0:
        return 1
    q = 1.0 - p_show
    target = delta_node / 2.0 ** (disagreements + 1)
    k = max(1, math.ceil(math.log(target) / math.log(q)))
    while q**k > target:  # guard the float rounding of the logarithms, both ways
        k += 1
    while k > 1 and q ** (k - 1) <= target:
        k -= 1
    return k


def clearing_error(p_show: float, delta_node: float) -> float:
    """Bound on the chance that the clearing rule clears one given faulty node (<= delta_node)."""
    if p_show >= 1.0:
        return 0.0
    total = 0.0
    for d in range(1000):
        term = (1.0 - p_show) ** required_streak(p_show, delta_node, d)
        total += term
        if term <= total * 1e-17:
            break
    return total


@dataclass
class _Log:
    """What the trials so far say about one node."""

    cleared: bool = False
    streak: int = 0  # agreeing trials in a row since the last disagreement
    disagreements: int = 0  # disagreeing trials before it was cleared
    trials: int = 0  # conclusive trials
    failures: int = 0  # trials that failed to run


@dataclass(frozen=True)
class _Reference:
    trace: str | None
    kind: ReferenceKind
    problem: str = ""  # the evidence contradicts the model: stop
    rounds_without_majority: int = 0


def plan(
    suspects: Sequence[str],
    results: Sequence[TrialResult],
    cfg: BisectConfig,
    *,
    reference_trace: str | None = None,
    known_good: Sequence[str] = (),
) -> Round | Verdict:
    """The next round to run, or the verdict. Pure: the same inputs give the same answer."""
    suspects, known_good = tuple(suspects), tuple(known_good)
    _validate(suspects, results, cfg, known_good)
    g = cfg.group_size
    rounds = _by_round(results)
    done = rounds[-1][0] if rounds else 0
    good = set(known_good)
    logs = {n: _Log() for n in suspects + known_good}
    for _, rs in rounds:
        for res in rs:
            for n in res.group:
                if res.trace is None:
                    logs[n].failures += 1
                else:
                    logs[n].trials += 1
    ref = _find_reference(rounds, good, reference_trace)
    verdict = _VerdictBuilder(suspects, done, cfg, ref.kind)
    if not suspects:
        return verdict.build(reason="No suspects to test.")
    if ref.problem:
        return verdict.build(inconclusive=suspects, reason=f"Stopped: {ref.problem}.")
    usable = [n for n in suspects if logs[n].failures <= cfg.max_retries]
    slots = cfg.max_parallel or _UNLIMITED
    # Known-good nodes that keep failing are not used as padding or for the reference group.
    good_pad = sorted(
        (k for k in known_good if logs[k].failures <= cfg.max_retries), key=lambda k: logs[k].failures
    )
    if len(suspects) + len(known_good) < g:
        return verdict.build(
            inconclusive=suspects,
            reason=f"A trial needs {g} nodes but only {len(suspects) + len(known_good)} suspects and "
            "known-good nodes exist.",
        )
    if ref.trace is None:
        return _plan_reference_round(suspects, usable, good_pad, logs, ref, cfg, done, slots, verdict)

    ev = _evaluate(suspects, rounds, ref.trace, logs, cfg)
    if ev.problem:
        return verdict.build(
            faulty=ev.named,
            cleared=ev.cleared,
            inconclusive=ev.undetermined,
            reason=f"Stopped: {ev.problem}.",
        )
    why: list[str] = []
    if ev.spent:
        why.append(f"{_names(ev.spent)} ran out of retries (trials failed to run)")
    if not ev.undetermined:
        return verdict.build(ev.named, ev.cleared, ev.spent, ev.unexplained, why, ev.eliminated)
    if done >= cfg.max_rounds:
        why.append(f"{_names(ev.undetermined)} still undetermined after max_rounds={cfg.max_rounds}")
        return verdict.build(
            ev.named, ev.cleared, ev.spent + ev.undetermined, ev.unexplained, why, ev.eliminated
        )

    index = {n: i for i, n in enumerate(suspects)}
    pad = good_pad + sorted(ev.pad, key=lambda n: (logs[n].failures, index[n]))
    pools = _disjoint_pools(ev.pools)
    in_pool = {n for p in pools for n in p}
    plain = sorted((n for n in ev.undetermined if n not in in_pool), key=lambda n: (logs[n].trials, index[n]))
    groups = _compose(
        pools,
        plain,
        pad,
        slots,
        g,
        premise=cfg.at_most_one_fault,
        quarantine=cfg.p_show < 1.0,
        offset=done,
        live=[frozenset(p) for p in ev.pools],
    )
    if not groups:
        why.append(
            f"{_names(ev.undetermined)} could not be split into smaller groups: "
            "add known_good nodes as padding"
        )
        return verdict.build(
            ev.named, ev.cleared, ev.spent + ev.undetermined, ev.unexplained, why, ev.eliminated
        )
    tested = {n for grp in groups for n in grp}
    reason = (
        f"Round {done + 1}: {len(groups)} group(s) of {g} against the {ref.kind} reference; "
        f"{len(tested & in_pool)} node(s) from disagreeing groups split up, "
        f"{len(tested.intersection(plain))} other undetermined node(s) tested."
    )
    return Round(done + 1, tuple(groups), reason)


def _plan_reference_round(
    suspects: tuple[str, ...],
    usable: list[str],
    good_pad: list[str],
    logs: dict[str, _Log],
    ref: _Reference,
    cfg: BisectConfig,
    done: int,
    slots: int,
    verdict: _VerdictBuilder,
) -> Round | Verdict:
    """No reference yet: run a known-good group beside the suspects, or a round that can hold a majority."""
    g = cfg.group_size
    if not usable:
        return verdict.build(
            inconclusive=suspects, reason="Every suspect ran out of retries: trials failed to run."
        )
    if done >= cfg.max_rounds:
        return verdict.build(
            inconclusive=suspects, reason=f"No reference trace within max_rounds={cfg.max_rounds}."
        )
    order = sorted(usable, key=lambda n: logs[n].trials)  # least tested first (sorted is stable)
    if len(good_pad) >= g:
        ref_group = tuple(good_pad[:g])
        groups = [
            ref_group,
            *_compose([], order, good_pad[g:], slots - 1, g, premise=False, quarantine=False, offset=done),
        ]
        return Round(
            done + 1,
            tuple(groups),
            f"Round {done + 1}: a group of known-good nodes sets the reference beside "
            f"{len(groups) - 1} group(s) of suspects.",
        )
    most = min(slots, len(usable), (len(usable) + len(good_pad)) // g)
    hint = "pass reference_trace or at least group_size known_good nodes"
    if most < 2:
        return verdict.build(
            inconclusive=suspects,
            reason=f"No reference: {len(usable)} suspect(s) in groups of {g} with "
            f"max_parallel={cfg.max_parallel} make at most {most} group per round, so no majority trace "
            f"can exist; {hint}.",
        )
    covered = all(logs[n].trials > 0 for n in usable)
    if (
        ref.rounds_without_majority
        and covered
        and (cfg.p_show >= 1.0 or ref.rounds_without_majority > cfg.max_retries)
    ):
        return verdict.build(
            inconclusive=suspects,
            reason=f"No reference: in {ref.rounds_without_majority} round(s) no trace was shared by a "
            f"majority of the groups, so the planner cannot tell the faulty group from the good one; {hint}.",
        )
    groups = _compose([], order, good_pad, slots, g, premise=False, quarantine=False, offset=done)
    return Round(
        done + 1,
        tuple(groups),
        f"Round {done + 1}: {len(groups)} group(s) of {g}; the majority trace will be the reference.",
    )


@dataclass
class _Evaluation:
    named: list[str]
    cleared: list[str]  # by trials or by elimination
    eliminated: list[str]
    undetermined: list[str]  # still to test
    spent: list[str]  # undetermined, out of retries
    pools: list[list[str]]  # candidates of disagreeing groups that hold a fault not yet named
    pad: list[str]  # cleared suspects fit to pad groups
    unexplained: list[tuple[str, ...]]
    problem: str = ""


def _evaluate(
    suspects: tuple[str, ...],
    rounds: list[tuple[int, list[TrialResult]]],
    ref: str,
    logs: dict[str, _Log],
    cfg: BisectConfig,
) -> _Evaluation:
    """Replay the trials in round order against the reference: who is cleared, named, still open."""
    is_suspect = set(suspects)
    delta_node = cfg.delta / len(suspects)
    disagreeing: list[frozenset[str]] = []
    for _, rs in rounds:
        for res in rs:
            members = [n for n in res.group if n in is_suspect]
            if res.trace is None or not members:
                continue
            agree = res.trace == ref
            for n in members:
                log = logs[n]
                if log.cleared:
                    continue  # clearance is final; later trials of a cleared node only pad
                if agree:
                    log.streak += 1
                    log.cleared = log.streak >= required_streak(cfg.p_show, delta_node, log.disagreements)
                else:
                    log.disagreements += 1
                    log.streak = 0
            if not agree:
                disagreeing.append(frozenset(members))
    by_trial = {n for n in suspects if logs[n].cleared}
    problem = ""
    eliminated: set[str] = set()
    live = [t - by_trial for t in disagreeing if t - by_trial]
    if cfg.at_most_one_fault and live:
        culprit = frozenset.intersection(*live)
        if culprit:
            eliminated = set(suspects) - by_trial - culprit
        else:
            problem = "at_most_one_fault does not hold: disagreeing groups with no open suspect in common"
    cleared = by_trial | eliminated
    named = {x for t in disagreeing for x in t - cleared if t - {x} <= cleared}
    unexplained = [tuple(n for n in suspects if n in t) for t in disagreeing if t <= by_trial]
    doubtful = {n for t in unexplained for n in t}
    open_ = [n for n in suspects if n not in cleared and n not in named]
    spent = [n for n in open_ if logs[n].failures > cfg.max_retries]
    pools = [
        [n for n in suspects if n in t - cleared]
        for t in disagreeing
        if not (t & named) and not (t & set(spent)) and len(t - cleared) >= 2
    ]
    return _Evaluation(
        named=[n for n in suspects if n in named],
        cleared=[n for n in suspects if n in cleared and n not in doubtful],
        eliminated=[n for n in suspects if n in eliminated],
        undetermined=[n for n in open_ if n not in spent] if not problem else open_,
        spent=spent,
        pools=pools,
        pad=[
            n for n in suspects if n in by_trial and n not in doubtful and logs[n].failures <= cfg.max_retries
        ],
        unexplained=list(dict.fromkeys(unexplained)),
        problem=problem,
    )


def _find_reference(
    rounds: list[tuple[int, list[TrialResult]]], good: set[str], reference_trace: str | None
) -> _Reference:
    known = [
        (r, res.trace)
        for r, rs in rounds
        for res in rs
        if res.trace is not None and all(n in good for n in res.group)
    ]
    if reference_trace is not None or known:
        trace = reference_trace if reference_trace is not None else known[0][1]
        odd = [r for r, t in known if t != trace]
        if odd:
            return _Reference(
                None,
                "none",
                problem=f"a group of known-good nodes in round {odd[0]} disagreed with the known-good "
                "reference, so the trial is not deterministic or the reference is stale",
            )
        return _Reference(trace, "known-good")
    fixed: tuple[int, str] | None = None
    without = 0
    for r, rs in rounds:
        traces = [res.trace for res in rs if res.trace is not None]
        if not traces:
            continue
        top, count = Counter(traces).most_common(1)[0]
        if count >= 2 and 2 * count > len(traces):
            if fixed is None:
                fixed = (r, top)
            elif top != fixed[1]:
                return _Reference(
                    None,
                    "none",
                    problem=f"the majority traces of rounds {fixed[0]} and {r} differ, so the trial is not "
                    "deterministic or most groups are faulty",
                )
        elif fixed is None:
            without += 1
    if fixed is None:
        return _Reference(None, "none", rounds_without_majority=without)
    return _Reference(fixed[1], "majority")


def _disjoint_pools(pools: list[list[str]]) -> list[list[str]]:
    """Keep the smallest pools (a superset says less), each node in the first pool that holds it."""
    sets = [frozenset(p) for p in pools]
    minimal = [p for p, s in zip(pools, sets, strict=True) if not any(o < s for o in sets)]
    out: list[list[str]] = []
    seen: set[str] = set()
    for p in minimal:
        rest = [n for n in p if n not in seen]
        seen.update(rest)
        if len(rest) >= 2:
            out.append(rest)
    return out


def _chunks(nodes: Sequence[str], parts: int) -> list[list[str]]:
    """``nodes`` in ``parts`` contiguous pieces whose sizes differ by at most one."""
    parts = max(1, min(parts, len(nodes)))
    q, r = divmod(len(nodes), parts)
    out, i = [], 0
    for j in range(parts):
        size = q + (j < r)
        out.append(list(nodes[i : i + size]))
        i += size
    return out


def _split(nodes: list[str], slots: int, g: int, *, is_pool: bool, premise: bool) -> list[list[str]]:
    """The units (suspects sharing one group) that test ``nodes`` with ``slots`` groups."""
    m = len(nodes)
    if slots >= m:
        return [[n] for n in nodes]
    if slots == 1:
        if is_pool:  # halving: the untested half is implicated if the tested one agrees
            return [nodes[: min(g, math.ceil(m / 2))]]
        if premise:  # the first test of an optimal bisection tree over m + 1 outcomes
            return [nodes[: min(g, 2 ** (math.ceil(math.log2(m + 1)) - 1))]]
        return [nodes[: min(g, m)]]
    if is_pool and (premise or math.ceil(m / slots) > g):
        return _chunks(nodes, max(slots + 1, math.ceil(m / g)))[:slots]  # leave a part out
    return _chunks(nodes, max(slots, math.ceil(m / g)))[:slots]


def _compose(
    pools: list[list[str]],
    plain: list[str],
    pad: list[str],
    slots: int,
    g: int,
    *,
    premise: bool,
    quarantine: bool,
    offset: int,
    live: Sequence[frozenset[str]] = (),
) -> list[tuple[str, ...]]:
    """Groups for one round: split every pool and the plain nodes over the slots, then pad.

    ``quarantine`` (intermittent faults): keep parts of disagreeing groups away from untested nodes,
    whose clearing streaks a show would reset; with no padding at all, test the untested nodes alone.
    """
    if quarantine and plain and len(pad) < g - 1:
        pools = []
    total = sum(map(len, pools)) + len(plain)
    slots = min(slots, total, (total + len(pad)) // g)
    if slots <= 0:
        return []
    cats = [(True, p) for p in pools] + ([(False, plain)] if plain else [])
    alloc = [0] * len(cats)
    left = slots
    while left:  # round-robin: every pool, then the plain nodes, get a group before any gets two
        grew = False
        for i, (_, nodes) in enumerate(cats):
            if left and alloc[i] < len(nodes):
                alloc[i] += 1
                left -= 1
                grew = True
        if not grew:
            break
    units: list[tuple[list[str], bool]] = []
    for (is_pool, nodes), s in zip(cats, alloc, strict=True):
        if s:
            units.extend((u, is_pool) for u in _split(nodes, s, g, is_pool=is_pool, premise=premise))
    units.sort(key=lambda unit: not unit[1])  # stable: parts of disagreeing groups first
    pool_nodes = [n for p in pools for n in p]
    pooled = set(pool_nodes)
    spare = plain[offset % len(plain) :] + plain[: offset % len(plain)] if plain else []
    pads = list(pad)
    used: set[str] = set()
    groups: list[tuple[str, ...]] = []

    def fillers(unit: list[str], count: int) -> list[str] | None:
        """``count`` more suspects for ``unit``, or None. Parts of disagreeing groups go together,
        untested nodes together (so a show does not reset healthy nodes' clearing streaks); mixing
        only as a last resort, never for a part under ``quarantine``. No group holds all open members
        of a disagreeing group: it would disagree again and tell nothing new (a deterministic
        bisection would repeat that round forever)."""
        is_pool = unit[0] in pooled
        if is_pool:
            order = pool_nodes + ([] if quarantine else spare)
        else:
            order = spare + pool_nodes
        out: list[str] = []
        for n in order:
            if len(out) == count:
                break
            if (
                n not in used
                and n not in unit
                and n not in out
                and not any(p <= {*unit, *out, n} for p in live)
            ):
                out.append(n)
        return out if len(out) == count else None

    def place(unit: list[str]) -> None:
        take = min(g - len(unit), len(pads))
        extra = fillers(unit, g - len(unit) - take)
        if extra is None or any(p <= set(unit) for p in live):
            return
        used.update(unit, extra)
        groups.append((*unit, *extra, *pads[:take]))
        del pads[:take]

    # Padding goes to the parts of disagreeing groups first: only cleared company tells them apart.
    for unit, _ in units:
        rest = [n for n in unit if n not in used]
        if rest and len(groups) < slots:
            place(rest)
    for n in pool_nodes + spare:  # slots left over (groups dropped for want of padding): any new group
        if len(groups) < slots and n not in used:
            place([n])
    return groups


class _VerdictBuilder:
    def __init__(self, suspects: tuple[str, ...], rounds: int, cfg: BisectConfig, reference: ReferenceKind):
        self.suspects, self.rounds, self.cfg, self.reference = suspects, rounds, cfg, reference

    def build(
        self,
        faulty: Sequence[str] = (),
        cleared: Sequence[str] = (),
        inconclusive: Sequence[str] = (),
        unexplained: Sequence[tuple[str, ...]] = (),
        why: Sequence[str] = (),
        eliminated: Sequence[str] = (),
        reason: str = "",
    ) -> Verdict:
        cfg, n = self.cfg, len(self.suspects)
        doubtful = {x for t in unexplained for x in t}
        inconclusive = [x for x in self.suspects if x in set(inconclusive) | doubtful]
        by_trial = len(set(cleared) - set(eliminated)) + len(doubtful)
        eps = clearing_error(cfg.p_show, cfg.delta / n) if n else 0.0
        confidence = max(0.0, 1.0 - by_trial * eps)
        if not reason:
            reason = self._sentence(faulty, cleared, inconclusive, unexplained, why, eliminated, confidence)
        return Verdict(
            faulty=tuple(faulty),
            cleared=tuple(cleared),
            inconclusive=tuple(inconclusive),
            rounds=self.rounds,
            confidence=confidence,
            reference=self.reference,
            reason=reason,
            unexplained=tuple(unexplained),
        )

    def _sentence(
        self,
        faulty: Sequence[str],
        cleared: Sequence[str],
        inconclusive: Sequence[str],
        unexplained: Sequence[tuple[str, ...]],
        why: Sequence[str],
        eliminated: Sequence[str],
        confidence: float,
    ) -> str:
        cfg = self.cfg
        parts = []
        if faulty:
            parts.append(
                f"Named {_names(faulty)}: each was in a group whose trace differed from the {self.reference} "
                "reference while every other member was cleared"
            )
        else:
            parts.append(f"Named no node against the {self.reference} reference")
        clear = f"cleared {len(cleared)} of {len(self.suspects)}"
        if cfg.p_show < 1.0:
            k0 = required_streak(cfg.p_show, cfg.delta / len(self.suspects), 0)
            clear += f" after at least {k0} matching trials in a row each"
        if eliminated:
            clear += f" ({len(eliminated)} by elimination under at_most_one_fault)"
        parts.append(clear)
        if inconclusive:
            reasons = list(why) + [
                f"group ({', '.join(t)}) disagreed although each member passed without the others: "
                "a fault between them (a link?) or a wrongly cleared node"
                for t in unexplained
            ]
            parts.append(f"{len(inconclusive)} inconclusive: " + "; ".join(reasons))
        return "; ".join(parts) + f"; {self.rounds} round(s), confidence {confidence:.6g}."


def _names(nodes: Sequence[str], limit: int = 6) -> str:
    nodes = list(nodes)
    if len(nodes) <= limit:
        return ", ".join(nodes)
    return ", ".join(nodes[:limit]) + f" and {len(nodes) - limit} more"


def _by_round(results: Sequence[TrialResult]) -> list[tuple[int, list[TrialResult]]]:
    """Results grouped by round, in round order, each round sorted so input order does not matter."""
    rounds: dict[int, list[TrialResult]] = {}
    for res in results:
        rounds.setdefault(res.round, []).append(res)
    return [
        (r, sorted(rounds[r], key=lambda res: (res.group, res.trace is None, res.trace or "")))
        for r in sorted(rounds)
    ]


def _validate(
    suspects: tuple[str, ...], results: Sequence[TrialResult], cfg: BisectConfig, known_good: tuple[str, ...]
) -> None:
    if len(set(suspects)) != len(suspects):
        raise ValueError("suspects: node ids must be unique")
    if len(set(known_good)) != len(known_good):
        raise ValueError("known_good: node ids must be unique")
    both = set(suspects) & set(known_good)
    if both:
        raise ValueError(f"known_good: {sorted(both)} are also suspects")
    nodes = set(suspects) | set(known_good)
    busy: dict[int, set[str]] = {}
    for res in results:
        if res.round < 1:
            raise ValueError(f"results: round must be at least 1, got {res.round}")
        if len(res.group) != cfg.group_size or len(set(res.group)) != len(res.group):
            raise ValueError(f"results: group {res.group} must hold {cfg.group_size} distinct nodes")
        unknown = set(res.group) - nodes
        if unknown:
            raise ValueError(
                f"results: group {res.group} holds nodes that are neither suspects nor known_good"
            )
        again = busy.setdefault(res.round, set()) & set(res.group)
        if again:
            raise ValueError(f"results: {sorted(again)} appear in two groups of round {res.round}")
        busy[res.round].update(res.group)

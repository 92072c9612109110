"""Choosing the nodes of a generation: pure functions of the cluster view.

Rules: a generation uses healthy, uncordoned, undrained nodes that are heartbeating and not serving
another job. Surviving members keep their node rank (so their ranks, and the TCPStore of node rank 0
when it survives, stay put); a replacement takes the lost node's slot. Spares join only to replace:
the first generation never uses them, a re-formation prefers them. When no replacement exists, data
parallelism shrinks down to ``min_nodes`` if the global batch still divides, else the job waits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeView:
    node_id: str
    host: str = "127.0.0.1"
    store_port: int = 0
    ready: bool = True  # registered and heartbeating
    cordoned: bool = False
    draining: bool = False
    healthy: bool = True  # health verdict is not "unhealthy"
    spare: bool = False
    busy_with: str = ""  # the job it serves, if any
    heartbeat_age_s: float = 0.0

    @property
    def eligible(self) -> bool:
        return self.ready and self.healthy and not self.cordoned and not self.draining


@dataclass(frozen=True)
class Choice:
    members: tuple[str, ...]
    shrunk: bool
    replaced: tuple[tuple[str, str], ...]  # (lost node, replacement)
    reason: str


def free_nodes(nodes: Mapping[str, NodeView], job_id: str, current: Sequence[str]) -> list[str]:
    """Nodes the job could take now besides its current members (eligible, not another job's)."""
    return sorted(
        n.node_id
        for n in nodes.values()
        if n.eligible and n.busy_with in ("", job_id) and n.node_id not in current
    )


def choose_members(
    *,
    wanted: int,
    min_nodes: int,
    current: Sequence[str],
    nodes: Mapping[str, NodeView],
    job_id: str,
    fits: Callable[[int], bool],
    initial: bool,
) -> Choice | None:
    """The members of the next generation, or None when the job must wait for capacity."""
    usable = {n.node_id for n in nodes.values() if n.eligible and n.busy_with in ("", job_id)}
    free = free_nodes(nodes, job_id, current)
    primaries = [n for n in free if not nodes[n].spare]
    spares = [n for n in free if nodes[n].spare]
    pool = primaries if initial else spares + primaries

    members: list[str] = []
    replaced: list[tuple[str, str]] = []
    for m in current[:wanted]:
        if m in usable:
            members.append(m)
        elif pool:
            sub = pool.pop(0)
            members.append(sub)
            replaced.append((m, sub))
    while len(members) < wanted and pool:
        members.append(pool.pop(0))

    if len(members) == wanted:
        why = (
            "all wanted nodes available"
            if not replaced
            else "; ".join(f"{a} replaced by {b}" for a, b in replaced)
        )
        return Choice(tuple(members), False, tuple(replaced), why)
    if not initial and len(members) >= min_nodes and fits(len(members)):
        return Choice(
            tuple(members),
            True,
            tuple(replaced),
            f"no replacement available: data parallelism shrinks from {wanted} to {len(members)} nodes; "
            f"gradient accumulation keeps the global batch",
        )
    return None

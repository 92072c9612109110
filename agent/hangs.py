"""When the agent calls a rank hung: the decisions, apart from the processes they are about.

Two questions, from what the rank's heartbeat (:mod:`stanchion.sdk.liveness`) and the kernel say:

- **Is the process frozen?** Its heartbeat thread beats every 50 ms whatever the main thread does
  (collectives release the GIL). A heartbeat silent for ``frozen_after_s`` (0.25 s) from a process
  the kernel reports stopped by a signal (state ``T`` in ``/proc/PID/stat``: SIGSTOP, SIGTSTP) is a
  frozen rank: it cannot take another step until someone continues it, and its peers are blocked on
  it. That is decided in a quarter of a second, with no false alarm on a busy machine: a process
  that is merely starved of CPU is runnable (``R``), never ``T``. A process being traced by a
  debugger is in state ``t`` and is left alone. This holds for a rank that trains; a rank between
  generations (it left one, or joins the next) is the coordinator's first-step deadline's to judge,
  which escalates a generation that does not form and leaves out the node that did not join.
- **Has it stopped stepping?** A rank with no step within its step limit (the agent's
  ``max(hang_factor x median step, hang_floor_s)``) is hung when its heartbeat is missing or silent
  for ``wedged_after_s`` (a wedged interpreter, a process stuck in the kernel), or when it is
  running outside any collective. It is not hung while blocked in a collective (it waits on a peer,
  whom this rule catches on that peer's node) or in a pause it announced (evaluation, a blocking
  checkpoint: :func:`stanchion.pause`).
- **Will its collective ever complete?** A collective can wedge with every rank alive and waiting
  in it (a message lost in the backend, a peer whose agent cannot act): no rank is outside one, and
  only the backend's own timeout (minutes) would end it. A rank blocked in one collective for longer
  than its deadline is hung: ``collective_factor`` (10) times the longest of that collective's recent
  completed calls in this process (the heartbeat carries it), and never less than twice the step
  limit, so that a peer which stopped outside a collective is caught first, on its own node, and
  only it is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stanchion.sdk.liveness import COLLECTIVE, PAUSED, Beat


@dataclass(frozen=True)
class Limits:
    frozen_after_s: float = 0.25  # heartbeat silence of a process stopped by a signal
    wedged_after_s: float = 3.0  # heartbeat silence of any other process with no step in its limit
    collective_factor: float = 10.0  # a collective's deadline, in its longest recent durations


def frozen(pid: int, beat: Beat | None, now: float, state_of: Callable[[int], str], limits: Limits) -> str:
    """Why the process is frozen, or "" when it is not (or has never beaten)."""
    if beat is None or beat.pid != pid:
        return ""
    silent = now - beat.t
    if silent <= limits.frozen_after_s or state_of(pid) != "T":
        return ""
    return f"stopped by a signal (process state T): no heartbeat for {silent:.2f}s, at step {beat.step}"


def not_stepping(
    pid: int, beat: Beat | None, now: float, idle_s: float, limit_s: float, limits: Limits
) -> str:
    """Why a training rank with no step for ``idle_s`` (limit ``limit_s``) is hung, or ""."""
    if idle_s <= limit_s:
        return ""
    where = f"no step for {idle_s:.1f}s (limit {limit_s:.1f}s)"
    if beat is None or beat.pid != pid:
        return f"{where} and no heartbeat from its process"
    silent = now - beat.t
    if silent > limits.wedged_after_s:
        return f"{where} and no heartbeat for {silent:.1f}s"
    if beat.doing == COLLECTIVE:
        blocked = now - beat.since
        deadline = max(2 * limit_s, limits.collective_factor * beat.usual_s)
        if blocked <= deadline:
            return ""  # waiting on a peer
        return (
            f"{where}: blocked in {beat.what!r} for {blocked:.1f}s, past its deadline {deadline:.1f}s "
            f"({limits.collective_factor:g} x its longest recent call, {beat.usual_s:.3f}s; at least "
            "twice the step limit)"
        )
    if beat.doing == PAUSED:
        return ""  # a pause it announced
    return f"{where} outside any collective"

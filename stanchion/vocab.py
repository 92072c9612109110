"""The protocol's vocabularies: event kinds, exit and restart reasons and resume modes, named once.

Each is a string enum: a member equals its plain string value (``EventKind.STARTED == "started"``,
with the same hash, so a string read from a file or off the wire finds a member in a set or dict),
and it serialises as that value in ``json.dumps``, protobuf string fields, ``str()`` and f-strings.
What is on the wire and in files is the values; the members only name them in code.

Python 3.10 has no ``enum.StrEnum``, hence :class:`Vocab`.
"""

from __future__ import annotations

import enum


class Vocab(str, enum.Enum):
    """A string enum whose members format as their value (``StrEnum`` before Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return str(self.value).__format__(format_spec)


class EventKind(Vocab):
    """The ``event`` field of a record a trainer rank appends to its ``events.jsonl``.

    Detector events (:data:`DETECTORS`) carry ``suspect_ranks`` (possibly empty) and keep a flight
    record of the last progress records.
    """

    STANDBY = "standby"  # a pre-warmed rank finished importing and waits for an assignment
    JOINING = "joining"  # about to enter a generation's rendezvous
    STARTED = "started"  # the process group formed for a generation and state was restored
    RESTORED = "restored"  # state loaded from a checkpoint
    HEALED = "healed"  # state received from a live data-parallel peer
    HEAL_ROLLBACK = "heal_rollback"  # before healing, went back to a snapshot whose fingerprints agreed
    NONDETERMINISTIC = "nondeterministic"  # the start-up replay did not reproduce bit for bit
    NUMERICS_CHANGED = "numerics_changed"  # resumed under other precision/determinism settings
    NONFINITE = "nonfinite"  # detector: a non-finite loss or gradient norm; the step was skipped
    SPIKE = "spike"  # detector: loss or gradient norm far outside its recent window
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"  # detector: replicas' state fingerprints differ
    AUDIT_MISMATCH = "audit_mismatch"  # detector: a neighbour's recomputed gradient digest differs
    ROLLBACK = "rollback"  # an in-job rollback request applied (restored an in-memory snapshot)
    ROLLBACK_UNAVAILABLE = "rollback_unavailable"  # no snapshot old enough for a rollback request
    CHECKPOINT_COMMITTED = "checkpoint_committed"  # a checkpoint was written and committed
    CHECKPOINT_SKIPPED = "checkpoint_skipped"  # not written (replicas disagree), or one that failed to verify
    CHECKPOINT_FAILED = "checkpoint_failed"  # writing a checkpoint failed; training goes on
    CHECKPOINT_ABANDONED = "checkpoint_abandoned"  # one in flight dropped: the group broke
    COLLECTIVE_FAILED = "collective_failed"  # a peer vanished; waiting for the next generation
    GENERATION_CHANGE = "generation_change"  # every rank left at a step for a newer generation
    ABANDONED = "abandoned"  # gave up forming a group: a newer assignment (or a stop) arrived
    FAULT_INJECTED = "fault_injected"  # a scheduled test fault fired in this rank
    EVAL = "eval"  # a validation loss
    # A rank's own compute time stayed above its peers' median (stanchion.sdk.stragglers); reported by
    # that rank, with ``ratio``, ``own_s``, ``peers_s`` and ``window``. And when it no longer does.
    STRAGGLER = "straggler"
    STRAGGLER_CLEARED = "straggler_cleared"
    FINISHED = "finished"  # trained every step; carries the final fingerprint and validation loss
    STOPPED = "stopped"  # SIGTERM honoured: checkpoint written, exiting 0


# The detectors: every rank reports the same detection; the coordinator acts on it once.
DETECTORS = frozenset(
    {EventKind.NONFINITE, EventKind.SPIKE, EventKind.FINGERPRINT_MISMATCH, EventKind.AUDIT_MISMATCH}
)

# The event kinds an agent relays to the coordinator (it stores them all, and acts on some).
FORWARDED = frozenset(
    {
        EventKind.JOINING,
        EventKind.STARTED,
        EventKind.HEALED,
        EventKind.RESTORED,
        *DETECTORS,
        EventKind.ROLLBACK,
        EventKind.ROLLBACK_UNAVAILABLE,
        EventKind.CHECKPOINT_COMMITTED,
        EventKind.CHECKPOINT_SKIPPED,
        EventKind.CHECKPOINT_FAILED,
        EventKind.COLLECTIVE_FAILED,
        EventKind.GENERATION_CHANGE,
        EventKind.ABANDONED,
        EventKind.FINISHED,
        EventKind.STOPPED,
        EventKind.EVAL,
        EventKind.FAULT_INJECTED,
        EventKind.NONDETERMINISTIC,
        EventKind.NUMERICS_CHANGED,
        EventKind.STRAGGLER,
        EventKind.STRAGGLER_CLEARED,
    }
)

# A rank that left its generation after one of these waits for the next assignment.
LEFT_GENERATION = frozenset({EventKind.COLLECTIVE_FAILED, EventKind.GENERATION_CHANGE, EventKind.ABANDONED})


class AgentEventKind(Vocab):
    """The ``kind`` of an event an agent reports of its own, beside the trainer events it relays
    (:data:`FORWARDED`; the two share the field, so no value is in both). The coordinator stores them
    all and acts on ``worker_exited``."""

    WORKER_EXITED = "worker_exited"  # a rank's process ended; ``reason`` in the detail is an ExitReason
    HEALTH = "health"  # the node's health verdict changed (detail: ``verdict``, ``reason``)
    STALE_DIRECTIVE = "stale_directive"  # a directive of an older generation was ignored
    DIRECTIVE_REJECTED = "directive_rejected"  # a directive this node refuses (a path outside its dirs)
    DIRECTIVE_FAILED = "directive_failed"  # applying a directive raised


class CoordinatorEventKind(Vocab):
    """The ``kind`` of an event the coordinator records of its own in a job's event log (beside the
    events agents report), which ``stanchion job events`` streams. No value is an agent's or a rank's."""

    DECISION = "decision"  # the state machine changed the job (detail: reason, from, to, actions)
    NODE_REGISTERED = "node_registered"  # an agent registered
    NODE_LOST = "node_lost"  # a node's heartbeats stopped (detail: ``age_s``)
    # A member's restarted agent adopted the ranks still running on its node; the job went on
    # (detail: ``ranks``, ``generation``).
    RANKS_ADOPTED = "ranks_adopted"
    NODE_UNHEALTHY = "node_unhealthy"  # a node's agent reported the verdict unhealthy
    # An operator cordoned, drained or uncordoned a node: ``node_`` and the node's new state.
    NODE_CORDONED = "node_cordoned"
    NODE_DRAINING = "node_draining"
    NODE_READY = "node_ready"
    CONTROLLER_ERROR = "controller_error"  # a reported event could not be applied (see the coordinator log)
    BISECTION_DONE = "bisection_done"  # a bisection ended (detail: the run)


class RestartReason(Vocab):
    """Why the coordinator started a new generation: a job's ``restarts_by_reason`` keys and the
    ``reason`` label of ``stanchion_job_restarts_total`` (exported for every member, 0 until counted)."""

    CRASH = "crash"  # a rank exited with an error or a signal
    HANG = "hang"  # the agent killed a rank that made no progress
    NODE_LOST = "node_lost"  # a member's heartbeats stopped
    # A detector's response ended in a new generation: the node of a named rank is replaced, an
    # in-place rollback could not be applied, or an older generation reported the alarm.
    NONFINITE = "nonfinite"
    SPIKE = "spike"
    FINGERPRINT = "fingerprint"  # replica fingerprints differ
    AUDIT = "audit"  # the recomputation audit disagrees
    HEALTH = "health"  # reserved for node health verdicts (exported, not yet counted)
    MANUAL = "manual"  # reserved for operator-requested restarts (exported, not yet counted)
    DRAIN = "drain"  # an operator drained a member
    COLLECTIVE_FAILED = "collective_failed"  # a rank lost its peers and no failure was reported
    RECONCILE = "reconcile"  # after a coordinator restart, members did not report the generation
    BISECTION = "bisection"  # a bisection named the faulty nodes; the job resumes without them
    FIRST_STEP_TIMEOUT = "first_step_timeout"  # a generation missed its first-step deadline
    STRAGGLER = "straggler"  # straggler_policy "replace": a straggler's node was replaced by a spare


class ExitReason(Vocab):
    """Why a rank's process ended, as its agent classifies it: the ``reason`` in the detail of a
    ``worker_exited`` event (:class:`AgentEventKind`) and the kind of the coordinator's ``WorkerFailed``.

    Not a subset of :class:`RestartReason`: ``crash`` and ``hang`` are both (a failed rank restarts the
    job for that reason, :data:`EXIT_RESTART_REASON`), the others end no generation or, ``config``,
    fail the job.
    """

    FINISHED = "finished"  # exit 0 after training every step
    STOPPED = "stopped"  # exit 0 otherwise, or any exit after the agent asked it to stop
    SUPERSEDED = "superseded"  # left: not part of the new generation (``contract.EXIT_SUPERSEDED``)
    CONFIG = "config"  # the trainer rejected its configuration (``contract.EXIT_CONFIG``): the job fails
    CRASH = "crash"  # an error exit or a signal
    HANG = "hang"  # the agent killed it: no progress
    STANDBY_LOST = "standby_lost"  # a standby rank (no slot yet) died; the agent starts another


# The exits of a rank that ended cleanly (its state is EXITED; the others are FAILED).
CLEAN_EXITS = frozenset({ExitReason.FINISHED, ExitReason.STOPPED, ExitReason.SUPERSEDED})

# The exits the coordinator acts on (``WorkerFailed``): a crash or a hang restarts, a bad config fails the job.
FAILED_EXITS = frozenset({ExitReason.CRASH, ExitReason.HANG, ExitReason.CONFIG})

# The restart reason of a failed rank's exit that ends in a new generation.
EXIT_RESTART_REASON = {ExitReason.CRASH: RestartReason.CRASH, ExitReason.HANG: RestartReason.HANG}


# The restart reason of a detector's response that ends in a new generation.
DETECTOR_RESTART_REASON = {
    EventKind.NONFINITE: RestartReason.NONFINITE,
    EventKind.SPIKE: RestartReason.SPIKE,
    EventKind.FINGERPRINT_MISMATCH: RestartReason.FINGERPRINT,
    EventKind.AUDIT_MISMATCH: RestartReason.AUDIT,
}


class Resume(Vocab):
    """How the ranks of a new generation obtain their state (``StartWorkers.resume``, ``Assignment.resume``)."""

    FRESH = "fresh"  # start from step 0 (initial weights)
    CHECKPOINT = "checkpoint"  # load the named checkpoint, or the newest good one when none is named
    # Survivors keep their state and the others receive it from a live data-parallel peer; a
    # checkpoint when no rank holds state.
    PEER = "peer"

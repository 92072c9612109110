"""What the guard checks and how often: the ``integrity`` keys of a job (``Protections`` in the SDK).

Pure standard library, so a coordinator validates job specs without torch. Every field has the
default the built-in trainer runs with; 0 disables a periodic protection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stanchion.settings import require


@dataclass(frozen=True)
class Protections:
    # K: replica fingerprints of parameters and optimizer state; 0 disables. Every step by default: a
    # corruption is caught at the step it lands, before its gradients reach any all-reduce, and a
    # replica lost to a crash never takes unseen damage with it (healing then loses no step; with
    # K > 1 a heal first goes back to the last agreement, up to K steps).
    fingerprint_every: int = 1
    audit_every: int = 80  # M: ring recomputation audit; 0 disables
    # In-memory snapshot cadence (only of state a fingerprint check agreed on: see snapshot.py). At 2 a
    # rollback after a corruption redoes two to four steps; every step (1) saves one more but its host
    # copy costs about 4% of a small model's step on a 2-core CPU (docs/benchmarks.md, integrity).
    snapshot_every: int = 2
    snapshots_kept: int = 2
    # A snapshot is copied to host memory while the next step's forward and backward run, and
    # completed before its optimizer step. A loop that writes parameters or optimizer state itself,
    # between steps, must turn this off (the copy would race with its writes).
    snapshot_in_background: bool = True
    spike_window: int = 50  # trailing steps for the robust z-score
    spike_min_history: int = 20
    spike_loss_z: float = 8.0
    spike_grad_z: float = 10.0
    # Floor on the z-score's scale as a fraction of the window median (stanchion.sdk.monitors.DEFAULT_REL_FLOOR):
    # on a quiet window a spike must also exceed the median by more than spike_*_z * this, relatively.
    spike_rel_floor: float = 0.02
    flight_records: int = 200  # progress records each rank keeps for the flight recorder
    # Stragglers (stanchion.sdk.stragglers): a rank whose own compute time, over the median of its
    # peers', has a median above straggler_ratio over the last straggler_window steps; 0 disables.
    straggler_window: int = 20
    straggler_ratio: float = 1.2
    startup_check: bool = True  # replay the first step twice and compare fingerprints (determinism proof)
    # What a rank does itself on a fingerprint mismatch: "report" (the coordinator decides) or
    # "rollback" in place to the newest agreed snapshot (for runs without a coordinator).
    on_mismatch: Literal["report", "rollback"] = "report"

    def __post_init__(self) -> None:
        for key in ("fingerprint_every", "audit_every", "snapshot_every"):
            require(getattr(self, key) >= 0, f"integrity.{key}", "must be >= 0 (0 disables)")
        require(self.snapshots_kept >= 1, "integrity.snapshots_kept", "must be >= 1")
        require(self.spike_window >= 3, "integrity.spike_window", "must be >= 3")
        require(
            3 <= self.spike_min_history <= self.spike_window,
            "integrity.spike_min_history",
            "must be between 3 and integrity.spike_window",
        )
        require(self.spike_loss_z > 0, "integrity.spike_loss_z", "must be > 0")
        require(self.spike_grad_z > 0, "integrity.spike_grad_z", "must be > 0")
        require(
            0 < self.spike_rel_floor < 1,
            "integrity.spike_rel_floor",
            "must be > 0 and < 1 (a fraction of the median)",
        )
        require(self.flight_records >= 1, "integrity.flight_records", "must be >= 1")
        require(self.straggler_window >= 0, "integrity.straggler_window", "must be >= 0 (0 disables)")
        require(
            self.straggler_ratio > 1,
            "integrity.straggler_ratio",
            "must be > 1 (a straggler's compute time over its peers' median; 1.2: 20% slower)",
        )

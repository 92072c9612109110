"""The SDK's implementation: what ``stanchion.join`` and ``stanchion.guard`` are made of.

- :mod:`~stanchion.sdk.runtime`: ``join()``, the process's link to its job (files, liveness, groups).
- :mod:`~stanchion.sdk.guard`: the guard around a training loop, one step at a time.
- The protections it composes: :mod:`~stanchion.sdk.control` (the per-step agreement),
  :mod:`~stanchion.sdk.fingerprint`, :mod:`~stanchion.sdk.audit`, :mod:`~stanchion.sdk.monitors`,
  :mod:`~stanchion.sdk.snapshot`, :mod:`~stanchion.sdk.checkpoint` and :mod:`~stanchion.sdk.manifest`,
  :mod:`~stanchion.sdk.parallel` (groups, gradient averaging, healing), :mod:`~stanchion.sdk.skips`.
- The contract with an agent (:mod:`~stanchion.sdk.contract`, standard library only, so the agent
  imports it without torch), :mod:`~stanchion.sdk.liveness` and :mod:`~stanchion.sdk.faults`
  (replayable fault injection for chaos runs).

Only the names ``stanchion`` exports are stable; these modules are internal.
"""

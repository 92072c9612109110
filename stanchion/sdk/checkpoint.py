"""Checkpoints through torch.distributed.checkpoint, with Stanchion's manifest as the commit marker.

Save: every rank writes its part of ``step-N.tmp/`` (DCP fsyncs each file); after a barrier rank 0
renames the directory to ``step-N/`` and writes ``manifest.json`` last (step, config, data cursor,
RNG, per-file CRC-32, parameter and optimizer-state fingerprint). Writing, the barrier and the commit
run on a background thread with their own gloo process group, so they never interleave with the
training collectives.

Staging (the copy of the state that an asynchronous save writes out) runs on a thread of its own,
into host buffers kept from one checkpoint to the next (pinned on a GPU): the checkpoint step does
not wait for it, and it overlaps the next step's forward and backward, which only read the state.
The next write of the state (the optimizer step, a rollback, a restore) first waits for it:
:meth:`CheckpointManager.settle`. What training waited, in the call and in that wait, is the
checkpoint's stall (``last_stall_s``). Plain ``dcp.async_save`` instead copies into new buffers
inside the call, so its caller waits for the whole copy and its allocation every time.

Load: the newest checkpoint that verifies (or a named one), through DCP, which reshards to the
current world size. After loading, the live state's fingerprint must equal the manifest's.
"""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from stanchion.files import fsync_dir
from stanchion.sdk import manifest as mf
from stanchion.sdk.parallel import CollectiveFailed, collective
from stanchion.vocab import EventKind

log = logging.getLogger(__name__)

EventSink = Callable[[EventKind, dict[str, Any]], None]
# DCP gathers every rank's write errors into a CheckpointException, which derives from BaseException.
CHECKPOINT_ERRORS = (Exception, CheckpointException)


def describe_error(e: BaseException) -> str:
    """One line per failing rank for DCP's combined exception, else the exception itself."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        # DCP stores each rank's failure as (exception, traceback summary)
        causes = {r: x[0] if isinstance(x, tuple) and x else x for r, x in failures.items()}
        return "; ".join(
            f"rank {r}: {type(x).__name__}: {str(x).splitlines()[0] if str(x) else ''}"
            for r, x in sorted(causes.items())
        )
    return f"{type(e).__name__}: {e}"


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()))


# Executors whose checkpoint was abandoned while its thread was still blocked (see abandon()).
_abandoned_threads: list[concurrent.futures.ThreadPoolExecutor] = []


def blocked_by_abandoned_checkpoint() -> bool:
    """Whether a thread of an abandoned checkpoint may still be blocked in a collective: the
    interpreter would wait for it at exit (executor threads are joined), so the process exits
    without that wait (trainer/__main__.py)."""
    return any(t.is_alive() for ex in _abandoned_threads for t in getattr(ex, "_threads", ()))


def new_stager(device: torch.device) -> DefaultStager:
    """The staging of asynchronous checkpoints: on a thread, into buffers reused across checkpoints
    (DCP caches them per source storage), pinned with non-blocking copies on an accelerator. One per
    process, closed when it ends (:meth:`DefaultStager.close`)."""
    accel = device.type != "cpu"
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=accel,
            use_shared_memory=False,
            use_async_staging=True,
            use_non_blocking_copy=accel,
        )
    )


class CheckpointManager:
    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        keep: int,
        async_save: bool,
        events: EventSink,
        process_group: dist.ProcessGroup | None,
        fault_point: Callable[[int, str], None] | None = None,
        generation: int = 0,
        stager: DefaultStager | None = None,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep = keep
        self.async_save = async_save
        self.events = events
        self.pg = process_group
        self.fault_point = fault_point  # the fault injector's hook (chaos tests), else None
        self.generation = generation
        self._abandoned = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self._pending: concurrent.futures.Future[Any] | None = None
        self.stager = stager  # None: DCP's default, staging inside the call into new buffers
        self._staging: concurrent.futures.Future[None] | None = None
        self.last_stall_s = 0.0
        self.last_committed_step = -1
        self.in_flight_step = -1
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    # -- saving ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        fields: dict[str, Any],
        *,
        blocking: bool = False,
        since: float | None = None,
    ) -> float:
        """Start saving the state after ``step`` steps; returns the seconds training was blocked,
        from ``since`` (a ``time.perf_counter()`` reading: the caller's own preparation, such as
        the state's fingerprint for the manifest, counts too) or else from this call."""
        t0 = time.perf_counter() if since is None else since
        self.wait()  # one save in flight at a time
        tmp = self.root / f"{mf.step_dir_name(step)}.g{self.generation}.tmp"
        final = self.root / mf.step_dir_name(step)
        if final.exists() and (final / mf.MANIFEST).exists():
            try:
                same = mf.read_manifest(final).get("fingerprint") == fields.get("fingerprint")
            except (OSError, ValueError):
                same = False
            if same:
                log.info("checkpoint %s already committed with this state", final.name)
                return 0.0
            # A replay after a rollback reached this step with other state: the new one replaces it.
        tmp.mkdir(parents=True, exist_ok=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        fields = {**fields, "step": step, "rng": rng_state()}
        if self.async_save and not blocking:
            with collective("staging an asynchronous checkpoint"):
                fut = dcp.async_save(
                    state, checkpoint_id=str(tmp), process_group=self.pg, async_stager=self.stager
                )
            if isinstance(fut, AsyncSaveResponse):  # staging goes on while the next step computes
                self._staging, fut = fut.staging_completion, fut.upload_completion
            self.last_stall_s = time.perf_counter() - t0
            self._pending = self._executor.submit(self._finish, fut, step, tmp, final, fields)
            self.in_flight_step = step
        else:
            # In the foreground every rank waits on its peers here: marked as a collective so an
            # agent sees a rank waiting on a stopped peer, not a rank stuck by itself.
            with collective("writing a checkpoint"):
                error: BaseException | None = None
                try:
                    dcp.save(state, checkpoint_id=str(tmp), process_group=self.pg)
                except CHECKPOINT_ERRORS as e:  # storage errors are reported; training goes on
                    error = e
                self._finish(None, step, tmp, final, fields, error)
            self.last_stall_s = time.perf_counter() - t0
        return self.last_stall_s

    def _finish(
        self,
        fut: concurrent.futures.Future[Any] | None,
        step: int,
        tmp: Path,
        final: Path,
        fields: dict[str, Any],
        error: BaseException | None = None,
    ) -> None:
        agreed = False
        try:
            if fut is not None and error is None:
                try:
                    fut.result()
                except CHECKPOINT_ERRORS as e:  # a full disk, a storage error
                    error = e
            if self.fault_point is not None:
                self.fault_point(step, "commit")
            if self._abandoned:  # the group broke while it was in flight: its vote can never complete
                log.warning("checkpoint at step %d abandoned with its generation; never committed", step)
                return
            # Every rank reaches this vote, failed or not: commit only if every part was written.
            # (an all-gather rather than a MIN all-reduce, so the message can name the failed ranks)
            mine = torch.tensor([0 if error is not None else 1], dtype=torch.int64)
            oks = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self.pg))]
            with collective("the checkpoint's commit vote"):
                dist.all_gather(oks, mine, group=self.pg)
            agreed = True
            if error is not None:
                raise error
            failed = [r for r, ok in enumerate(oks) if not int(ok)]
            if failed:
                ranks = ", ".join(map(str, failed))
                raise RuntimeError(f"rank {ranks} failed to write its part (its own event has the error)")
            if self.rank == 0 and not self._abandoned:
                replaced = final.with_name(f"{final.name}.replaced")
                if final.exists():  # step reached again with other state (after a rollback)
                    shutil.rmtree(replaced, ignore_errors=True)
                    os.replace(final, replaced)
                os.replace(tmp, final)
                fsync_dir(self.root)
                manifest = mf.write_manifest(final, fields)
                self.last_committed_step = step
                nbytes = sum(f["bytes"] for f in manifest["files"].values())
                self.events(
                    EventKind.CHECKPOINT_COMMITTED,
                    {
                        "step": step,
                        "path": str(final),
                        "fingerprint": fields.get("fingerprint", ""),
                        "replicas_agree": fields.get("replicas_agree", True),
                        "bytes": nbytes,
                    },
                )
                shutil.rmtree(replaced, ignore_errors=True)
                removed = mf.apply_retention(self.root, self.keep)
                if removed:
                    log.info("retention removed %s", ", ".join(p.name for p in removed))
        except CHECKPOINT_ERRORS as e:  # a failed save must never stop training
            if fut is None and isinstance(e, CollectiveFailed):
                raise  # in the foreground, a lost peer: the caller's generation re-forms and saves again
            # The free space says at once whether a full disk is the cause (a short write can
            # surface as a serializer error rather than ENOSPC).
            free = shutil.disk_usage(self.root).free
            log.error("checkpoint at step %d failed (%d bytes free on %s): %s", step, free, self.root, e)
            self.events(
                EventKind.CHECKPOINT_FAILED, {"step": step, "error": describe_error(e), "free_bytes": free}
            )
            if agreed and self.rank == 0:  # every rank is done with it: free the space now
                shutil.rmtree(tmp, ignore_errors=True)

    def settle(self) -> float:
        """Wait until the checkpoint in flight has copied the state (before anything writes it);
        returns the seconds waited, which count in the checkpoint's stall. Staging is local: it
        always ends, and a failed copy surfaces in the save's own future (reported there)."""
        if self._staging is None:
            return 0.0
        t0 = time.perf_counter()
        concurrent.futures.wait([self._staging])
        self._staging = None
        waited = time.perf_counter() - t0
        self.last_stall_s += waited
        return waited

    def wait(self) -> None:
        self.settle()
        if self._pending is not None:
            with collective("waiting for the checkpoint in flight"):  # its commit vote waits on peers
                self._pending.result()
            self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def abandon(self) -> int | None:
        """The process group broke: drop the checkpoint in flight without waiting for it.

        Its background work may be blocked in a collective with a dead or departed peer until the
        group's timeout (DCP reports a rank's failure to the others through further collectives, so
        survivors can wait on each other); waiting for it would keep this rank from re-forming. It is
        never committed: a generation writes into its own ``.gN.tmp`` directory, and the commit step
        checks the flag. Returns the step of the abandoned checkpoint, or None if none was in flight.
        """
        self._abandoned = True
        self.settle()  # the copy is local and ends; whoever writes the state next may then do so
        pending, self._pending = self._pending, None
        self._executor.shutdown(wait=False, cancel_futures=True)
        if pending is None or pending.done():
            return None
        _abandoned_threads.append(self._executor)
        return self.in_flight_step

    # -- loading --------------------------------------------------------------------------------
    def find_resume(
        self, explicit: str = "", *, max_step: int | None = None, fallback: bool = False
    ) -> Path | None:
        """The named checkpoint (verified), or the newest that verifies; skipped ones become events.

        A named checkpoint that no longer verifies is an error for a person who named it; for a
        coordinator that named it from an earlier verification (``fallback``), storage rotted since:
        the newest good one before it is used instead, and the skip is reported.
        """
        if explicit:
            path = Path(explicit)
            if not path.is_absolute() and not path.exists():
                path = self.root / explicit
            v = mf.verify(path)
            if v.ok:
                return path
            if not fallback:
                raise ValueError(f"checkpoint {path} cannot be used: {v.reason}")
            if self.rank == 0:
                self.events(
                    EventKind.CHECKPOINT_SKIPPED,
                    {"path": str(path), "reason": v.reason, "step": mf.parse_step(path) or 0},
                )
            step = mf.parse_step(path)
            max_step = (
                min(max_step, step - 1)
                if max_step is not None and step is not None
                else (step - 1 if step is not None else max_step)
            )
        path, skipped = mf.newest_good(self.root, max_step=max_step)
        if self.rank == 0:
            for p, reason in skipped:
                log.warning("skipping checkpoint %s: %s", p.name, reason)
                self.events(
                    EventKind.CHECKPOINT_SKIPPED,
                    {"path": str(p), "reason": reason, "step": mf.parse_step(p) or 0},
                )
        return path

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load ``path`` into model and optimizer (resharding as needed); returns its manifest."""
        manifest = mf.read_manifest(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with collective("loading a checkpoint"):
            dcp.load(state, checkpoint_id=str(path), process_group=self.pg)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=True),
        )
        if "rng" in manifest:
            set_rng_state(manifest["rng"])
        return manifest

"""Process groups, data-parallel gradient synchronisation and in-place healing.

Two ways to form a group:

- **torchrun / `stanchion train`**: the standard ``env://`` contract, once per process.
- **Stanchion agents**: an :class:`~stanchion.sdk.contract.Assignment` names the generation, the rank and
  the agent-hosted TCPStore. Every generation uses its own key prefix in that store, so a restarted
  rank can never read a previous generation's addresses (the stale-store bug torchrun has with gloo),
  and a surviving rank can leave a broken group and join the next one without restarting its process.

Every collective goes through :func:`collective`, which turns a backend failure (a peer died or was
partitioned) into :class:`CollectiveFailed`, the one exception the loop treats as "wait for the next
generation" instead of a crash.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors  # for the state broadcast
from torch.distributed.tensor import DTensor

from stanchion.sdk import liveness
from stanchion.sdk.contract import Assignment
from stanchion.sdk.snapshot import local_shard

log = logging.getLogger(__name__)


class CollectiveFailed(RuntimeError):
    """A collective failed because the group broke (a peer died, hung or was partitioned)."""


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    generation: int
    device: torch.device
    managed: bool  # formed from an agent's assignment: can re-form in place

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def env_topology() -> tuple[int, int, int, int]:
    """(rank, world, local_rank, local_world) from the torchrun environment (1 process when unset)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, world, local_rank, local_world


class Abandoned(Exception):
    """A newer generation was assigned while this rank waited for its peers to arrive."""


# Every rank has arrived when the connections are made: they take well under a second when things
# work, so this bounds what a peer dying at that moment costs (the first-step deadline is >= 30 s).
FORM_TIMEOUT_S = 15.0


def form_group(
    assign: Assignment | None,
    *,
    device_kind: str,
    timeout_s: float,
    form_timeout_s: float = FORM_TIMEOUT_S,
    abandon: Callable[[], bool] = lambda: False,
) -> Topology:
    """Initialise the default process group for this generation.

    Agent-managed ranks first meet at a counter in the store, polling ``abandon`` while they wait:
    a rank whose generation is superseded before every peer arrived (a member died on the way)
    leaves at once instead of blocking in ``init_process_group`` until its timeout. Once all have
    arrived, the connections get ``form_timeout_s``: a peer that dies between arriving and
    connecting costs that, not the collective timeout (``init_process_group`` cannot poll).
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if assign is None:
        rank, world, local_rank, local_world = env_topology()
        device = pick_device(device_kind, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend, rank=rank, world_size=world, timeout=timeout, device_id=_device_id(device)
            )
        else:  # a single process with no launcher: a private in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return Topology(rank, world, local_rank, local_world, 0, device, managed=False)

    device = pick_device(device_kind, assign.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = _connect_store(assign, timeout_s, abandon)
    # One key space per (job, generation): a restarted rank can never read an older generation's keys.
    prefixed = dist.PrefixStore(f"stanchion/{assign.job_id}/gen{assign.generation}/", store)
    with collective("waiting for the generation's ranks"):
        arrived = prefixed.add("arrived", 1)
        deadline = time.monotonic() + timeout_s
        while arrived < assign.world_size:
            if abandon():
                raise Abandoned(
                    f"generation {assign.generation} superseded while {arrived}/{assign.world_size} ranks had arrived"
                )
            if time.monotonic() > deadline:
                raise CollectiveFailed(
                    f"only {arrived}/{assign.world_size} ranks arrived within {timeout_s:.0f}s"
                )
            time.sleep(0.005)
            arrived = prefixed.add("arrived", 0)
    try:
        with collective("forming the process group"):
            dist.init_process_group(
                backend,
                store=prefixed,
                rank=assign.rank,
                world_size=assign.world_size,
                timeout=datetime.timedelta(seconds=min(timeout_s, form_timeout_s)),
                device_id=_device_id(device),
            )
    except CollectiveFailed as e:
        _forget_failed_group()
        if abandon():
            raise Abandoned(f"generation {assign.generation} superseded while it formed: {e}") from None
        raise
    dist.group.WORLD.set_timeout(timeout)  # the connections are made: collectives get the full timeout
    return Topology(
        assign.rank,
        assign.world_size,
        assign.local_rank,
        assign.local_world_size,
        assign.generation,
        device,
        managed=True,
    )


STORE_CONNECT_TRY_S = 2.0  # one connection attempt to the rendezvous store; abandon() is polled between


def _connect_store(assign: Assignment, timeout_s: float, abandon: Callable[[], bool]) -> dist.TCPStore:
    """Connect to the generation's rendezvous store, in short attempts that poll ``abandon``.

    The store lives in an agent; if that agent restarted, the assigned address is dead and a single
    connect would retry it for the whole timeout, deaf to the newer generation that replaced this one.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try_s = max(0.1, min(STORE_CONNECT_TRY_S, deadline - time.monotonic()))
        try:
            store = dist.TCPStore(
                assign.master_addr,
                assign.master_port,
                is_master=False,
                timeout=datetime.timedelta(seconds=try_s),
            )
            store.set_timeout(datetime.timedelta(seconds=timeout_s))
            return store
        except RuntimeError as e:  # DistStoreError: refused or timed out
            if abandon():
                raise Abandoned(
                    f"generation {assign.generation} superseded while its rendezvous store "
                    f"{assign.master_addr}:{assign.master_port} was unreachable"
                ) from None
            if time.monotonic() > deadline:
                raise CollectiveFailed(
                    f"rendezvous store {assign.master_addr}:{assign.master_port} unreachable for "
                    f"{timeout_s:.0f}s: {e}"
                ) from None


def _forget_failed_group() -> None:
    """After a failed ``init_process_group``, undo what it left in torch's global state.

    The default group's keys in the store are prefixed with torch's group counter, which
    ``init_process_group`` increments before it connects and only ``destroy_process_group`` resets.
    A process whose formation failed would otherwise use prefix 1 in its next generation while a
    fresh peer uses 0: both wait for keys the other never writes. (torch has no public reset; this
    is the one line ``destroy_process_group`` runs for the default group.)
    """
    if not dist.is_initialized():
        dist.distributed_c10d._world.group_count = 0


def new_group(timeout_s: float, form_timeout_s: float = FORM_TIMEOUT_S) -> dist.ProcessGroup:
    """A gloo group over every rank of the generation, formed under the same bound as the default one."""
    with collective("creating a process group"):
        pg = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=min(timeout_s, form_timeout_s))
        )
    pg.set_timeout(datetime.timedelta(seconds=timeout_s))
    return pg


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def leave_group(*, broken: bool = False) -> None:
    """Tear down the default group (and every other); safe to call on a broken group.

    NCCL: the communicators are aborted (``_abort_process_group``, torch's API for this), which
    ends collectives stuck on the device; destroying them would wait for those. gloo, ``broken``
    (a collective failed or was given up): the groups are forgotten at once and shut down by a
    background thread, because ``destroy_process_group`` joins gloo's worker threads first, and one
    may stay blocked until the collective timeout: of two operations in flight when a peer died, the
    one a live peer still expects can sit queued behind the one that failed, on both sides, so
    each survivor's shutdown waits for the other's. gloo after a clean end: destroyed.
    """
    if not dist.is_initialized():
        return
    if broken:
        _left_broken.append(True)
    with contextlib.suppress(Exception):
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        elif broken:
            # The leave thread holds the only references to the groups: dropping the last one runs
            # their destructors, which join gloo's worker threads, so in the calling thread it
            # would wait as long as destroying them. Not a daemon: one still inside torch when the
            # interpreter shuts down aborts the process; a program that ends through the guard
            # (or exit_process) does not wait for it either (see left_broken_group).
            threading.Thread(target=_shut_down, args=(_forget_groups(),), name="stanchion-leave").start()
        else:
            dist.destroy_process_group()
    _forget_failed_group()


_left_broken: list[bool] = []  # non-empty once this process has left a broken group


def left_broken_group() -> bool:
    """Whether this process has left a broken group (``leave_group(broken=True)``). Collectives of
    that group may still be in flight in the backend's own threads (gloo ends them only when a peer
    closes its connections or the group's timeout passes), and one that ends while the interpreter
    shuts down must take the GIL to free its tensors, which aborts the process ("terminate called
    without an active exception"): such a process ends with ``os._exit`` (see
    :func:`stanchion.sdk.runtime.exit_process`)."""
    return bool(_left_broken)


def _forget_groups() -> list[dist.ProcessGroup]:
    """What ``destroy_process_group()`` does to torch's bookkeeping after shutting the groups down,
    without the shutdown (torch has no public way to leave without waiting; pinned torch 2.13).
    Returns the groups, newest first, for :func:`_shut_down`."""
    c10d = dist.distributed_c10d
    w = c10d._world
    groups = sorted(w.pg_names, key=lambda g: w.pg_names[g], reverse=True)
    c10d._update_default_pg(None)
    for table in (
        w.pg_map,
        w.pg_names,
        w.pg_group_ranks,
        w.pg_backend_config,
        w.pg_to_tag,
        w.tags_to_pg,
        w.pg_coalesce_state,
    ):
        table.clear()
    c10d._unregister_all_process_groups()
    w.group_count = 0
    return groups


def _shut_down(groups: list[dist.ProcessGroup]) -> None:
    for g in groups:
        with contextlib.suppress(Exception):
            g.shutdown()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a distributed backend failure inside this block into CollectiveFailed. The heartbeat
    says the rank is blocked in ``what`` meanwhile, and learns how long ``what`` usually takes."""
    entry, completed = liveness.enter(what), False
    try:
        yield
        completed = True
    except (CollectiveFailed, Abandoned):
        raise
    except (RuntimeError, dist.DistError) as e:  # gloo raises RuntimeError("... Connection closed by peer")
        raise CollectiveFailed(f"{what}: {e}") from e
    finally:
        liveness.leave(entry, completed=completed)


def is_backend_failure(e: BaseException) -> bool:
    """Whether ``e``, raised outside any :func:`collective` block, came from the distributed
    backend (a peer was lost), not from the program: torch's DistError family (NCCL), or gloo's
    RuntimeError, whose message names the gloo source file that raised it. FSDP runs its own
    collectives inside the user's forward and backward passes, where this tells them apart."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo/" in str(e))


def prepare_environment(env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """NCCL settings read when a process group starts (unless the environment names them).

    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``: torch's NCCL watchdog must not tear the process down on a
    peer's error or a timeout (its default): the rank itself gives the collective up (:func:`wait`),
    aborts the communicator (:func:`leave_group`) and re-forms in place with its state.
    """
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


# How long one wait on a collective blocks before the rank looks up (whether to give it up).
WAIT_SLICE_S = 0.1
NCCL_POLL_S = 0.0002  # NCCL: the host polls the collective's CUDA event this often


@dataclass
class WaitPolicy:
    """When a rank gives up on a collective in flight (set for each generation by the runtime)."""

    timeout_s: float = 300.0  # the job's collective timeout
    # A collective is only given up once it has waited this long: a planned membership change is
    # agreed at a step boundary, which every rank reaches within milliseconds of the others.
    grace_s: float = 1.0
    # Why to give up now (None: keep waiting). Under an agent: a newer assignment exists, i.e. the
    # coordinator has already decided the next generation because a peer is gone.
    abandon: Callable[[], str | None] = lambda: None


wait_policy = WaitPolicy()


def wait(work: Any, what: str) -> None:
    """Wait for an asynchronous collective to complete, inside the failure boundary.

    Why not ``work.wait()``: with NCCL it returns at once (it only orders the current stream after
    the collective) and a collective whose peer is gone never completes, so a survivor would block in
    whatever touched the result next, outside any boundary, until the watchdog killed it. Here the
    wait is bounded and is given up, as :class:`CollectiveFailed`, when the job's timeout passes or
    the policy says the generation is over. The caller then leaves the group (:func:`leave_group`
    aborts an NCCL communicator, which frees kernels stuck on the device) and re-forms in place.
    """
    start = time.monotonic()
    deadline = start + wait_policy.timeout_s
    with collective(what):
        while not _completed(work):
            why = wait_policy.abandon() if time.monotonic() - start >= wait_policy.grace_s else None
            if why:
                raise CollectiveFailed(f"{what}: given up: {why}")
            if time.monotonic() > deadline:
                raise CollectiveFailed(f"{what}: not complete after {wait_policy.timeout_s:g} s")
        work.wait()  # raises the backend's error if it failed


def _completed(work: Any) -> bool:
    """Whether ``work`` is done, after blocking for at most about one slice."""
    if work.is_completed():
        return True
    if _polls():  # NCCL: wait(timeout) would spin and may tear the communicator down on a timeout
        end = time.monotonic() + WAIT_SLICE_S
        while time.monotonic() < end:
            time.sleep(NCCL_POLL_S)
            if work.is_completed():
                return True
        return False
    try:  # gloo: a wait that wakes at completion; on a timeout it raises, and the work stays waitable
        work.wait(timeout=datetime.timedelta(seconds=WAIT_SLICE_S))
    except RuntimeError:  # timed out (still pending), or failed (then work.wait() raises the error)
        return bool(work.is_completed())
    return True


def _polls() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def all_gather_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """Gather a 1-D tensor from every rank into a (world, n) tensor on the CPU."""
    return start_all_gather_rows(t, what)()


def start_all_gather_rows(t: torch.Tensor, what: str) -> Callable[[], torch.Tensor]:
    """Start gathering a 1-D tensor from every rank; the function returned waits for the result
    and gives the (world, n) tensor on the CPU. Waiting includes the copy to the host, which is
    where a collective on an accelerator actually completes, so a failure surfaces inside
    :func:`collective` either way."""
    world = dist.get_world_size()
    out = [torch.empty_like(t) for _ in range(world)]
    with collective(what):
        work = dist.all_gather(out, t, async_op=True)

    def result() -> torch.Tensor:
        wait(work, what)
        with collective(what):
            return torch.stack(out).cpu()

    return result


class GradSync:
    """Data-parallel gradient averaging in fixed buckets, overlapped with the backward pass.

    Why not torch's DDP: DDP re-buckets gradients after its first iteration by the order they became
    ready, so a restarted process reduces in a different layout than the uninterrupted one and, with
    three or more ranks, the sums differ in their last bits. Here the buckets are fixed by the
    parameter order alone (reversed: the last layers' gradients are ready first), so every step is
    bit-exact across restarts and membership changes, whether a bucket's all-reduce starts during
    the backward pass or after it. The reduction runs in the buckets' own buffers: a rank's local
    gradients stay in ``p.grad`` until :meth:`all_reduce_mean` copies the averages back, which is the
    seam the integrity checks use (the audit's digest, a fault injected before the all-reduce).

    Overlap: :meth:`arm` before the backward pass that completes the gradients (the last
    micro-batch's), :meth:`disarm` after it; a bucket whose every gradient has been accumulated then
    starts its all-reduce at once. A gradient that changes after its bucket started (a backward pass
    the caller did not announce) makes that bucket start again at the end. `stanchion bench sdk`
    compares its throughput with torch DDP.
    """

    FIRST_BUCKET_BYTES = 1 << 20
    BUCKET_BYTES = 25 << 20

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        # DDP's sizes: a small first bucket (the last layers' gradients, ready first) starts
        # communicating early; the rest go in large buckets, since every all-reduce has a fixed cost.
        self.buckets: list[list[int]] = []
        size = 0
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            last = self.buckets[-1] if self.buckets else None
            cap = self.FIRST_BUCKET_BYTES if len(self.buckets) == 1 else self.BUCKET_BYTES
            if last is None or size >= cap or self.params[last[0]].dtype != p.dtype:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += p.numel() * p.element_size()
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self.flat: list[torch.Tensor | None] = [None] * len(self.buckets)  # allocated once, reused
        self._ready = [0] * len(self.buckets)
        self._pending: dict[int, Any] = {}  # bucket -> its all-reduce in flight
        self._stale: set[int] = set()  # buckets whose gradients changed after they started
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def arm(self) -> None:
        """The next backward pass completes the step's gradients: start buckets as they fill."""
        self.reset()
        self._armed = dist.is_initialized() and dist.get_world_size() > 1

    def disarm(self) -> None:
        self._armed = False

    def reset(self) -> None:
        """Forget a step's buckets (one that failed may have left some in flight)."""
        if self._pending:  # left by a step that failed: never reuse a buffer an old op may touch
            self.flat = [None] * len(self.buckets)
        self._pending.clear()
        self._stale.clear()
        self._ready = [0] * len(self.buckets)

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def ready(_param: torch.Tensor) -> None:
            b = self.bucket_of[i]
            if b in self._pending:  # changed after its all-reduce started
                self._stale.add(b)
                return
            if not self._armed:
                return
            self._ready[b] += 1
            if self._ready[b] == len(self.buckets[b]):
                self._start(b)

        return ready

    def _start(self, b: int) -> None:
        grads = [self.params[i].grad.reshape(-1) for i in self.buckets[b]]
        if self.flat[b] is None:
            self.flat[b] = torch.empty(
                sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device
            )
        torch.cat(grads, out=self.flat[b])
        with collective("gradient all-reduce"):
            self._pending[b] = dist.all_reduce(self.flat[b], async_op=True)

    def all_reduce_mean(self, world_size: int) -> None:
        self._armed = False
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world_size == 1:
            self.reset()
            return
        for b in self._stale:  # let the stale ones finish, then start them again
            wait(self._pending.pop(b), "gradient all-reduce")
        for b in range(len(self.buckets)):
            if b not in self._pending:
                self._start(b)
        for work in self._pending.values():
            wait(work, "gradient all-reduce")
        self._pending.clear()
        self._stale.clear()
        with torch.no_grad():
            for b, bucket in enumerate(self.buckets):
                flat = self.flat[b]
                flat.div_(world_size)
                offset = 0
                for i in bucket:
                    g = self.params[i].grad
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()


def broadcast_training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    *,
    src: int,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Copy model, optimizer state and ``extra`` (step, data cursor, monitors) from rank ``src`` (a
    global rank) to the other ranks of ``group`` (default: all).

    This is how a replacement rank heals from a live replica instead of from disk. Tensors travel in
    one flat buffer per dtype; the optimizer's structure travels as a small object first. A sharded
    model (FSDP2's DTensors) sends each rank's local shard: ``group`` then holds the ranks with the
    same shards (one replica dimension of the mesh), and the receiver's optimizer state is wrapped
    back into DTensors laid out like its parameters.
    """
    rank = dist.get_rank()
    device = next(model.parameters()).device
    if rank == src:
        osd = optimizer.state_dict()
        tensors: list[torch.Tensor] = []
        skeleton = _strip_tensors(osd, tensors)
        spec = [(tuple(t.shape), str(t.dtype).removeprefix("torch."), str(t.device)) for t in tensors]
        header: list[Any] = [{"extra": extra, "optim": skeleton, "spec": spec}]
    else:
        header = [None]
    with collective("broadcasting the training state header"):
        dist.broadcast_object_list(
            header, src=src, group=group, device=device if device.type == "cuda" else None
        )
    meta = header[0]
    if rank != src:
        tensors = [
            torch.empty(shape, dtype=getattr(torch, dtype), device=dev) for shape, dtype, dev in meta["spec"]
        ]
    model_tensors = [local_shard(t) for t in model.state_dict(keep_vars=False).values() if torch.is_tensor(t)]
    _broadcast_flat(model_tensors, src, group)
    _broadcast_flat(tensors, src, group)
    if rank != src:
        osd = _fill_tensors(meta["optim"], iter(tensors))
        _as_parameters_shards(osd, [p for g in optimizer.param_groups for p in g["params"]])
        optimizer.load_state_dict(osd)
    return meta["extra"]


def _as_parameters_shards(osd: dict[str, Any], params: list[torch.Tensor]) -> None:
    """Received optimizer state arrives as local tensors: those shaped like their parameter's
    local shard become DTensors on its mesh with its placements, as the optimizer made them."""
    for index, entry in osd.get("state", {}).items():
        p = params[int(index)]
        if not isinstance(p, DTensor):
            continue
        local_shape = p.to_local().shape
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape == local_shape:
                entry[k] = DTensor.from_local(
                    v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )


def _broadcast_flat(tensors: list[torch.Tensor], src: int, group: dist.ProcessGroup | None = None) -> None:
    by_key: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_key.setdefault((t.dtype, t.device), []).append(t)
    for (_dtype, _device), same in sorted(by_key.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = _flatten_dense_tensors(same)
        with collective("broadcasting the training state"):
            work = dist.broadcast(flat, src=src, group=group, async_op=True)
        wait(work, "broadcasting the training state")
        if dist.get_rank() != src:
            with torch.no_grad():
                for t, v in zip(same, _unflatten_dense_tensors(flat, same), strict=True):
                    t.copy_(v)


_TENSOR = "__stanchion_tensor__"


def _strip_tensors(obj: Any, out: list[torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        out.append(local_shard(obj.detach()))
        return {_TENSOR: len(out) - 1}
    if isinstance(obj, dict):
        return {k: _strip_tensors(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip_tensors(v, out) for v in obj)
    return obj


def _fill_tensors(obj: Any, it: Iterator[torch.Tensor]) -> Any:
    if isinstance(obj, dict) and set(obj) == {_TENSOR}:
        return next(it)
    if isinstance(obj, dict):
        return {k: _fill_tensors(v, it) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill_tensors(v, it) for v in obj)
    return obj

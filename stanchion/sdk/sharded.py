"""Re-forming a sharded model (FSDP2 / HSDP on a DeviceMesh) in place.

A model sharded with ``fully_shard`` is bound to its mesh: its parameters and its optimizer state
are DTensors that name the mesh, and FSDP keeps the mesh's process groups for its all-gathers,
reduce-scatters and (HSDP) all-reduces. When a generation breaks, every group dies with it, so a
surviving rank that re-forms in place must point that same mesh, the object everyone holds, at the
new generation's groups. The layout cannot change while a rank keeps its shard: the new mesh must
have the old one's shape and this rank the same coordinate, which holds when the world size is
unchanged (survivors keep their ranks, a replacement takes the lost rank's). Otherwise the rank
starts over as a new process, which builds its mesh for the new world.

torch has no public API to move a DeviceMesh to new process groups, so :func:`rebind` sets the
attributes ``DeviceMesh.__init__`` and FSDP's mesh-info dataclasses set (pinned torch 2.13;
tests/integration/test_sharded_reform.py fails if they move). A step cut short by the failure is
cleared with FSDP's public ``reset_iter_state``.

The ring audit needs a rank's own, unreduced gradient of one micro-batch, which under FSDP never
exists whole outside the backward pass: it is the input of FSDP's reduce-scatters, one per module
in backward order. :class:`LocalGradDigest` is installed as FSDP's reduce-scatter (the public
``set_custom_reduce_scatter``; it reduces exactly as FSDP's default) and fingerprints those inputs
while a capture is open.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

from stanchion.sdk.fingerprint import tensor_fingerprint

log = logging.getLogger(__name__)


class LayoutChanged(RuntimeError):
    """The new generation's world cannot hold this rank's shard where it was."""


def rebind(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Point ``mesh`` (and every FSDP module of ``model`` on it) at the current default group's
    generation: a mesh of the same shape is made on it and its groups taken over."""
    names = mesh.mesh_dim_names
    try:
        fresh = init_device_mesh(mesh.device_type, tuple(mesh.shape), mesh_dim_names=names)
    except (RuntimeError, ValueError) as e:  # the world size no longer fits the mesh's shape
        raise LayoutChanged(f"mesh {tuple(mesh.shape)} cannot be re-made: {e}") from e
    if fresh.mesh.tolist() != mesh.mesh.tolist() or fresh.get_coordinate() != mesh.get_coordinate():
        raise LayoutChanged(
            f"mesh {tuple(mesh.shape)}: this rank would move from {mesh.get_coordinate()} to "
            f"{fresh.get_coordinate()}"
        )
    mesh._dim_group_names = fresh._dim_group_names
    mesh._pg_registry = fresh._pg_registry
    mesh._flatten_mapping = {}  # flattened views of the old groups; made again when used
    for info in _mesh_infos(model):
        if info.mesh is not mesh:
            raise LayoutChanged("a module of the model is sharded on another mesh than the guard's")
        if getattr(info, "shard_mesh_dim", None) is not None:
            info.shard_process_group = mesh.get_group(info.shard_mesh_dim)
            info.reduce_scatter_process_group = None
        if getattr(info, "replicate_mesh_dim", None) is not None and hasattr(info, "replicate_process_group"):
            info.replicate_process_group = mesh.get_group(info.replicate_mesh_dim)
    reset_step(model)


def release(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Drop every reference the mesh and FSDP hold to the broken generation's groups. gloo closes a
    group's connections only when its last reference goes, and a peer blocked in one of FSDP's
    collectives (which never looks up to see a newer generation) waits on exactly those: once they
    close, its collective fails at once, and it re-forms too."""
    mesh._pg_registry = {}
    mesh._flatten_mapping = {}
    for info in _mesh_infos(model):
        if hasattr(info, "shard_process_group"):
            info.shard_process_group = None
            info.reduce_scatter_process_group = None
        if hasattr(info, "replicate_process_group"):
            info.replicate_process_group = None


def reset_step(model: torch.nn.Module) -> None:
    """Clear what a forward or backward pass cut short left in FSDP: ``reset_iter_state`` on each
    root (unsharded parameters, half-reduced gradients), then the gradients of unsharded
    parameters that backward had computed but FSDP had not yet reduced, which that reset keeps
    (the next backward would add to them). Its waits on the broken generation's collectives may
    raise; what they guard is discarded either way."""
    for m in model.modules():
        if isinstance(m, FSDPModule) and m._get_fsdp_state()._is_root:
            with contextlib.suppress(RuntimeError):
                m.reset_iter_state()
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        for group in m._get_fsdp_state()._fsdp_param_groups:
            for p in group.fsdp_params:
                p.unsharded_accumulated_grad = None
                unsharded = getattr(p, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None


def _mesh_infos(model: torch.nn.Module) -> list[Any]:
    """FSDP's mesh descriptions (each caches its process groups), every one once."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        for group in m._get_fsdp_state()._fsdp_param_groups:
            for owner in (group, *group.fsdp_params):
                for info in (owner.mesh_info, owner.post_forward_mesh_info):
                    if info is not None:
                        seen.setdefault(id(info), info)
    return list(seen.values())


class LocalGradDigest(DefaultReduceScatter):
    """FSDP's default reduce-scatter that, while :meth:`capture` is open, also fingerprints each
    input: this rank's unreduced gradients of one module, flattened as FSDP lays them out (the
    same on every rank for the same computation)."""

    def __init__(self) -> None:
        self._open: list[torch.Tensor] | None = None

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: Any,
        op: Any,
        async_op: bool = False,
    ) -> Any:
        if self._open is not None:
            self._open.append(tensor_fingerprint(input_tensor))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)

    @contextlib.contextmanager
    def capture(self, into: list[torch.Tensor]):  # noqa: ANN201 (a generator context manager)
        """Fingerprints of the reduce-scatters run inside the block are appended to ``into``."""
        self._open = into
        try:
            yield into
        finally:
            self._open = None


def install_grad_digest(model: torch.nn.Module) -> LocalGradDigest:
    """One :class:`LocalGradDigest` as the reduce-scatter of every FSDP module of ``model``."""
    comm = LocalGradDigest()
    for m in model.modules():
        if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_groups:
            for group in m._get_fsdp_state()._fsdp_param_groups:
                if type(group._reduce_scatter_comm) is not DefaultReduceScatter:
                    raise ValueError(
                        f"guard(): {type(m).__name__} has its own reduce-scatter "
                        f"({type(group._reduce_scatter_comm).__name__}); the ring audit reads gradients "
                        "at FSDP's default one: keep yours with Protections(audit_every=0)"
                    )
            m.set_custom_reduce_scatter(comm)
    return comm

"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors split along dim 0 over one 1-D
device mesh, each rank holding a block of rows (torch.chunk's split: ``ceil(rows / world)`` per rank, the last
ones shorter or empty).

SAM and SSAM work on the local shards (``p.to_local()`` is a view of the parameter, so adding to it moves the
parameter): the perturbation, the restore and the masks (plain bool tensors shaped like the local shard) are local,
and the gradient norm is this rank's squared norm summed over the ranks in one all-reduce.

A mask over the whole model is still one global top-k: ``ShardLayout.gather`` assembles the flat vector in the
unsharded order (parameters in order, each row-major, its rows rank after rank) from every rank's local pieces with
one all-gather, every rank selects on it identically, and keeps its own pieces (``ShardLayout.local``). The cost is
a global-size score vector (4 bytes per weight) and mask (1 byte per weight) on every rank while a mask is built;
SSAM-F's Fisher is measured on the unsharded parameters (``unsharded``), so it holds the full model and its Fisher
on every rank for that pass too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ShardLayout", "shard_layout", "local", "unsharded"]

try:  # torch >= 2.4; older torch has no DTensor parameters to meet
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writing to it writes the parameter); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    size = -(-n // world)
    start = min(rank * size, n)
    return start, min(start + size, n)


class ShardLayout:
    """Where each rank's local pieces lie in the flat global vector over ``params`` (see the module docstring)."""

    def __init__(self, params: list[Tensor], group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        # spans[r][i]: (start, end) of rank r's piece within parameter i's flat entries
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(self.world)]
        self.offsets = [0]  # global offset of each parameter
        for p in params:
            rows = p.shape[0] if p.dim() else 1
            row = p.numel() // max(rows, 1)
            for r in range(self.world):
                a, b = _rows(rows, r, self.world)
                self.spans[r].append((a * row, b * row))
            self.offsets.append(self.offsets[-1] + p.numel())
        self.sizes = [sum(b - a for a, b in spans) for spans in self.spans]
        self.numel = self.offsets[-1]

    def all_reduce_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def gather(self, local_flat: Tensor) -> Tensor:
        """Every rank's flat local pieces (parameters in order) -> the global flat vector, on every rank."""
        dtype = local_flat.dtype
        send = local_flat.reshape(-1).to(torch.uint8) if dtype == torch.bool else local_flat.reshape(-1)
        width = max(self.sizes)
        padded = torch.zeros(width, dtype=send.dtype, device=send.device)
        padded[: send.numel()] = send
        got = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(got, padded, group=self.group)
        pieces = []
        starts = [0] * self.world
        for i in range(len(self.offsets) - 1):
            for r in range(self.world):
                a, b = self.spans[r][i]
                pieces.append(got[r][starts[r] : starts[r] + b - a])
                starts[r] += b - a
        flat = torch.cat(pieces)
        return flat.to(torch.bool) if dtype == torch.bool else flat

    def local(self, global_flat: Tensor) -> Tensor:
        """This rank's pieces of a global flat vector, concatenated (parameters in order)."""
        flat = global_flat.reshape(-1)
        return torch.cat([flat[o + a : o + b] for o, (a, b) in zip(self.offsets, self.spans[self.rank])])


def shard_layout(params: list[Tensor]) -> tuple[ShardLayout | None, str]:
    """(layout, "") for FSDP2-sharded parameters, (None, "") for plain ones, (None, why) for DTensor parameters
    laid out otherwise (mixed with plain tensors, another placement, several meshes, an uneven split)."""
    dts = [p for p in params if is_dtensor(p)]
    if not dts:
        return None, ""
    if len(dts) != len(params):
        return None, f"{len(dts)} of the {len(params)} parameters are DTensors; allowed: all or none"
    mesh = dts[0].device_mesh  # type: ignore[attr-defined]
    for p in dts:
        pl = p.placements  # type: ignore[attr-defined]
        if p.device_mesh != mesh or mesh.ndim != 1:  # type: ignore[attr-defined]
            return None, "parameters on several or multi-dimensional device meshes (HSDP, tensor parallelism)"
        if not (len(pl) == 1 and type(pl[0]) is Shard and pl[0].dim == 0):
            return None, f"placement {pl}; allowed: (Shard(dim=0),) as fully_shard makes"
    layout = ShardLayout(params, mesh.get_group())
    for i, p in enumerate(params):
        a, b = layout.spans[layout.rank][i]
        if local(p).numel() != b - a:
            return None, (
                f"a local shard of {local(p).numel()} entries where torch.chunk's split gives {b - a}; "
                "allowed: fully_shard's even dim-0 split"
            )
    return layout, ""


@contextlib.contextmanager
def unsharded(model: nn.Module, params: list[Tensor]) -> Iterator[list[Tensor]]:
    """Run ``model`` as a plain module on full copies of its DTensor parameters (one all-gather each); yields the
    copies of ``params``, in order. FSDP's forward hooks are set aside meanwhile, so nothing is gathered, resharded
    or reduced behind the caller's back; the DTensor parameters and the hooks are put back on exit."""
    stashed: list[tuple[tuple[dict, ...], list[dict]]] = []
    swapped = []
    full: dict[int, Tensor] = {}
    try:
        for mod in model.modules():
            hooks: tuple[dict, ...] = (
                mod._forward_pre_hooks,
                mod._forward_hooks,
                mod._forward_pre_hooks_with_kwargs,
                mod._forward_hooks_with_kwargs,
                mod._forward_hooks_always_called,
            )
            stashed.append((hooks, [dict(h) for h in hooks]))
            for h in hooks:
                h.clear()
            for name, p in list(mod._parameters.items()):
                if p is not None and is_dtensor(p):
                    if id(p) not in full:
                        full[id(p)] = nn.Parameter(
                            p.full_tensor().detach(),  # type: ignore[attr-defined]
                            requires_grad=p.requires_grad,
                        )
                    mod._parameters[name] = full[id(p)]  # type: ignore[assignment]
                    swapped.append((mod, name, p))
        missing = [i for i, p in enumerate(params) if id(p) not in full]
        if missing:
            raise ValueError(
                f"model: {len(missing)} sharded optimizer parameters are not parameters of the model "
                "given to update_mask"
            )
        yield [full[id(p)] for p in params]
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p
        for hooks, saved in stashed:
            for h, s in zip(hooks, saved):
                h.clear()
                h.update(s)

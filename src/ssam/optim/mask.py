"""The sparse optimizers' masks: one flat bool buffer and a view of it per parameter.

All masks live in one flat tensor (when the parameters share a device); each parameter's mask is a view of its
stretch, laid out in memory as the parameter is (channels_last included). One buffer lets the multi-tensor path mask
every perturbation with one product over a concatenation instead of one kernel per tensor (see
``ssam.optim.perturb``), which is what a step costs on an accelerator: kernel launches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["FlatMask", "MaskSegment"]


class MaskSegment(NamedTuple):
    """A stretch of the buffer covering some consecutive parameters. ``plain_order``: the buffer holds every mask in
    logical (row-major) order; else each in its parameter's memory order."""

    mask: Tensor
    plain_order: bool


def _dense(t: Tensor) -> bool:
    """Whether t covers one gap-free stretch of memory (contiguous or channels_last), so it can be read flat."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class FlatMask:
    """Masks for a fixed list of parameters: set from one flat tensor, read back flat or per parameter.

    ``views[i]`` is the mask of ``params[i]`` (``None`` until the first ``set``). With parameters on several devices
    there is no shared buffer and each mask is its own tensor on its parameter's device.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = list(params)
        self.numel = sum(p.numel() for p in self.params)
        self.views: list[Tensor] | None = None
        self.buffer: Tensor | None = None
        self.plain_order = False  # every parameter contiguous when set: the buffer is in logical order
        self._dense = False  # every parameter dense when set: each mask view is one stretch in memory order
        self._ids = [id(p) for p in self.params]
        self._position = {i: n for n, i in enumerate(self._ids)}
        self._offsets = [0]
        for p in self.params:
            self._offsets.append(self._offsets[-1] + p.numel())
        self._strides: list[tuple[int, ...]] = []
        self._dead: list[Tensor] | None = None

    @property
    def is_set(self) -> bool:
        return self.views is not None

    def clear(self) -> None:
        self.views = self.buffer = self._dead = None

    def set(self, flat: Tensor) -> list[Tensor]:
        """Copy a flat mask over all entries (parameters in order, each in logical order) in; return the views."""
        flat = flat.reshape(-1)
        if flat.numel() != self.numel:
            raise ValueError(
                f"flat mask: got {flat.numel()} entries; allowed: exactly {self.numel}, one per entry of "
                "the maskable parameters"
            )
        params, offsets = self.params, self._offsets
        self._dead = None
        if len({p.device for p in params}) > 1:  # parameters spread over devices: one mask tensor each
            self.buffer = None
            self._dense = self.plain_order = False
            self.views = [
                flat[o : o + p.numel()].to(p.device, torch.bool).view(p.shape).clone() for p, o in zip(params, offsets)
            ]
            return self.views
        buf = self.buffer
        if buf is None or buf.device != params[0].device:
            buf = self.buffer = torch.empty(self.numel, dtype=torch.bool, device=params[0].device)
        self.plain_order = all(p.is_contiguous() for p in params)
        self._dense = all(_dense(p) for p in params)
        self._strides = [p.stride() for p in params]
        if self.plain_order:
            buf.copy_(flat)
        # Each mask is laid out in memory as its parameter is, so that the buffer and the gradients, both read in
        # memory order, line up entry for entry.
        views = []
        for p, o in zip(params, offsets):
            piece = buf[o : o + p.numel()]
            view = piece.as_strided(p.shape, p.stride()) if _dense(p) else piece.view(p.shape)
            if not self.plain_order:  # (else the one copy above already put every entry in place)
                view.copy_(flat[o : o + p.numel()].view(p.shape))
            views.append(view)
        self.views = views
        return views

    def flat(self) -> Tensor:
        """A new flat tensor of every mask, parameters in order, each in logical order."""
        if self.views is None:
            raise RuntimeError("no mask has been set yet")
        if self.buffer is not None and self.plain_order:
            return self.buffer.clone()  # the buffer is already the flat mask, in order
        device = self.views[0].device
        return torch.cat([v.reshape(-1).to(device) for v in self.views])

    def dead(self) -> list[Tensor]:
        """The parameters whose mask has no live entry (one host sync after each ``set``, then cached)."""
        if self.views is None:
            return []
        if self._dead is None:
            device = self.views[0].device
            alive = torch.stack([v.any().to(device) for v in self.views]).tolist()
            self._dead = [p for p, a in zip(self.params, alive) if not a]
        return self._dead

    def segment(self, params: list[Tensor], grads: list[Tensor]) -> MaskSegment | None:
        """The stretch of the buffer that the masks of ``params`` tile in order, if they do, the gradients share one
        dtype and the buffer's device, and (unless the buffer is in plain order) each parameter and gradient is laid
        out in memory as when the masks were set; else None.

        Runs every step, where the host's time is the step's time on an accelerator: list comparisons, no
        per-tensor branching.
        """
        buf = self.buffer
        if buf is None or not self._dense or not params or grads[0].device != buf.device:
            return None
        first = self._position.get(id(params[0]))
        n = len(params)
        if first is None or list(map(id, params)) != self._ids[first : first + n]:
            return None
        # In plain order the gradients are read in logical order whatever their layout (see perturb._masked_flat).
        # Otherwise they are read in memory order and must be laid out as their masks (every mask view is dense).
        if not self.plain_order:
            strides = self._strides[first : first + n]
            if strides != [g.stride() for g in grads] or strides != [p.stride() for p in params]:
                return None
        if len({g.dtype for g in grads}) != 1:  # one concatenation must not promote some gradients' precision
            return None
        return MaskSegment(buf[self._offsets[first] : self._offsets[first + n]], self.plain_order)

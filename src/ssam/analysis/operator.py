"""The Hessian-vector product every curvature estimate is built on, and the setting it runs in.

Every estimate studies the Hessian of ONE well-defined scalar: the mean loss over a fixed list of batches,
each batch weighted by its size over the total, so that unequal batches (a short last batch) give exactly
the Hessian of the mean over all examples.  ``loss_fn(outputs, targets)`` must return the batch MEAN (as
``nn.CrossEntropyLoss()`` does by default).

The model is put in eval mode while it is analysed, because in train mode BatchNorm would mix the examples
of a batch (the Hessian would then depend on how the data is batched) and would update its running
statistics.  Its modes, parameters, ``requires_grad`` flags and ``.grad`` fields are left as they were:
products are formed with ``torch.autograd.grad``, which never accumulates into ``.grad``.

Graph cache.  A product ``H v`` is a backward pass through the graph of the first gradient ``g(θ)``
(built by a forward pass and a backward pass with ``create_graph``).  That graph does not depend on ``v``,
so the operator keeps each batch's graph for later products while the graphs fit in ``graph_memory``
bytes; batches beyond the bound rebuild theirs at every product (a forward and a first backward again),
holding one graph at a time.  BENCHMARKS.md has what the cache saves.

Convolutions.  While a graph is built, stock convolution modules record nodes whose second derivative runs
on the first-order kernels (:mod:`.convolution`): the same products, faster.  ``first_order_convs=False``
keeps PyTorch's own double backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .convolution import first_order_kernels

__all__ = ["GRAPH_MEMORY_FRACTION", "HessianOperator", "analysis_mode", "default_graph_memory", "prepare_batches"]

Progress = Callable[[int], Any] | None

# The default bound on cached graphs, as a fraction of the memory free when the operator is built: a
# product needs transient memory about the size of one graph on top, and the process has other users.
GRAPH_MEMORY_FRACTION = 0.5
_FALLBACK_FREE = 4 << 30  # when the free memory cannot be read (not Linux): assume 4 GiB


def _to_device(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _batch_len(targets: Any) -> int:
    if torch.is_tensor(targets):
        return int(targets.shape[0]) if targets.dim() else 1
    return len(targets)


def prepare_batches(batches: Iterable, device: torch.device) -> list[tuple[Any, Any, int, float]]:
    """Materialise ``batches`` on ``device`` as ``(inputs, targets, size, weight)`` with weights summing to 1.

    Materialising once fixes the data: a shuffling DataLoader passed in would otherwise give a different
    Hessian at every product, which breaks Lanczos and power iteration alike.
    """
    staged = []
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise UsageError(f"batches[{i}]: got a {type(b).__name__}; allowed: an (inputs, targets) pair")
        x, y = b
        staged.append((_to_device(x, device), _to_device(y, device), _batch_len(y)))
    total = sum(n for _, _, n in staged)
    if total == 0:
        raise UsageError("batches: got no examples; allowed: at least one (inputs, targets) pair with examples")
    return [(x, y, n, n / total) for x, y, n in staged]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def analysis_mode(model: nn.Module, params: Sequence[Tensor] = (), device: Any = None) -> Iterator[torch.device]:
    """Eval mode (and ``device``, if given) for the duration; everything is put back on exit.

    Modes are restored module by module, since a caller may deliberately keep some submodules in eval
    mode while training.  ``params`` get ``requires_grad`` for the duration so that frozen parameters can
    still be analysed when asked for explicitly.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in params]
    original = _model_device(model)
    target = torch.device(device) if device is not None else original
    moved = target != original
    try:
        if moved:
            model.to(target)
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield target
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        if moved:
            model.to(original)


def default_graph_memory(device: torch.device) -> int:
    """``GRAPH_MEMORY_FRACTION`` of the memory free on ``device`` now (MemAvailable on a CPU)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _FALLBACK_FREE
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
    return int(free * GRAPH_MEMORY_FRACTION)


def check_graph_memory(graph_memory: Any) -> None:
    if graph_memory is None:
        return
    if isinstance(graph_memory, bool) or not isinstance(graph_memory, (int, float)) or not graph_memory >= 0:
        raise UsageError(f"graph_memory: got {graph_memory!r}; allowed: None (automatic) or a number of bytes >= 0")


class _SavedBytes:
    """Bytes of the tensors an autograd graph saves, each storage counted once, leaving out storages that
    exist anyway (parameters, buffers, inputs): what keeping the graph costs."""

    def __init__(self, existing: Iterable[Tensor]):
        self.seen = {self._ptr(t) for t in existing}
        self.bytes = 0

    @staticmethod
    def _ptr(t: Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, wrapped, meta)
            return None

    def pack(self, t: Tensor) -> Tensor:
        ptr = self._ptr(t)
        if ptr is not None and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t


class HessianOperator:
    """``v -> H v`` for the Hessian of the size-weighted mean loss with respect to ``params``.

    Vectors are flat 1-D tensors laid out as the concatenation of the parameters, so that the eigen-solvers
    can work with plain dot products.  Build it inside :func:`analysis_mode`; call :meth:`close` (or use it
    as a context manager) to free the cached graphs before the caller's next step.

    ``graph_memory``: bytes of batch graphs kept between products (module docstring); ``None``: half the
    memory free now; ``0``: none kept, every product rebuilds every graph.  ``first_order_convs``: see the
    module docstring.  After a first product,
    ``cached_batches``, ``graph_bytes`` (bytes kept) and ``rebuilds`` (graphs built) say what happened.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        batches: Iterable,
        params: Sequence[Tensor],
        device: torch.device,
        progress: Progress = None,
        graph_memory: int | None = None,
        first_order_convs: bool = True,
    ):
        check_graph_memory(graph_memory)
        self.first_order_convs = bool(first_order_convs)
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params)
        self.batches = prepare_batches(batches, device)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.progress = progress
        self.calls = 0
        self.graph_memory = default_graph_memory(self.device) if graph_memory is None else int(graph_memory)
        self.graph_bytes = 0
        self.rebuilds = 0
        # batch index -> its first gradient's live parts [(parameter index, g_i)]; [] when none has a graph
        self._graphs: dict[int, list[tuple[int, Tensor]]] = {}

    @property
    def cached_batches(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        self._graphs.clear()
        self.graph_bytes = 0

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def split(self, v: Tensor) -> list[Tensor]:
        """A flat vector as one view per parameter, shaped like it."""
        return [c.view(s) for c, s in zip(v.split(self.numels), self.shapes)]

    def _flat(self, parts: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                (h.reshape(-1) if h is not None else torch.zeros(k, dtype=self.dtype, device=self.device))
                for h, k in zip(parts, self.numels)
            ]
        )

    def _graph(self, b: int) -> tuple[list[tuple[int, Tensor]], bool]:
        """Batch ``b``'s gradient with its graph, and whether it stays cached after this product."""
        if b in self._graphs:
            return self._graphs[b], True
        x, y, _, _ = self.batches[b]
        on_cuda = self.device.type == "cuda"
        counter = _SavedBytes([*self.params, *self.model.buffers(), *_tensors(x), *_tensors(y)])
        before = torch.cuda.memory_allocated(self.device) if on_cuda else 0
        hooks = (
            contextlib.nullcontext() if on_cuda else torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
        )
        kernels = first_order_kernels(self.model) if self.first_order_convs else contextlib.nullcontext()
        with torch.enable_grad(), hooks, kernels:
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        del loss
        self.rebuilds += 1
        # A gradient without a graph is constant in the parameters: its block of H is zero.
        live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if on_cuda:
            size = torch.cuda.memory_allocated(self.device) - before
        else:
            size = counter.bytes + sum(g.untyped_storage().nbytes() for _, g in live)
        if not live or self.graph_bytes + size <= self.graph_memory:
            self._graphs[b] = live
            self.graph_bytes += size if live else 0
            return live, True
        return live, False

    def matvec(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """``[H v for v in vs]``: one backward through each batch's gradient graph per vector."""
        parts = [self.split(v) for v in vs]
        out = [torch.zeros(self.n, dtype=self.dtype, device=self.device) for _ in vs]
        for b, (_, _, _, w) in enumerate(self.batches):
            live, kept = self._graph(b)
            if not live:
                continue
            grads = [g for _, g in live]
            for k, pv in enumerate(parts):
                hv = torch.autograd.grad(
                    grads,
                    self.params,
                    grad_outputs=[pv[i] for i, _ in live],
                    retain_graph=kept or k < len(parts) - 1,
                    allow_unused=True,
                )
                out[k].add_(self._flat(hv), alpha=w)
            del grads, live
        self.calls += len(vs)
        if self.progress is not None:
            self.progress(len(vs))
        return out

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec([v])[0]

    def random(self, gen: torch.Generator, kind: str = "gaussian") -> Tensor:
        # Drawn on the CPU so that a seed gives the same vectors on every device.
        if kind == "rademacher":
            v = torch.randint(0, 2, (self.n,), generator=gen).to(self.dtype).mul_(2).sub_(1)
        else:
            v = torch.randn(self.n, generator=gen, dtype=torch.float64).to(self.dtype)
        return v.to(self.device)


def _tensors(obj: Any) -> list[Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []

"""Memory probes: the peak around one step (CUDA allocator, or the CPU process's resident high-water mark) and the
bytes an optimizer keeps in its state."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterable

import torch

from .timing import sync


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory around one step. CUDA: allocator peak. CPU: the process's resident high-water mark (VmHWM, reset
    through /proc/self/clear_refs where allowed); RSS counts the whole process, so every model resident shows."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif _proc_status("VmHWM") is not None:
            self.kind = "cpu_vmhwm_process" if self._can_reset() else "cpu_vmhwm_process_unreset"
        else:
            self.kind = "cpu_ru_maxrss_process"

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        rss = _proc_status("VmRSS")
        return rss if rss is not None else 0

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_vmhwm_process":
            self._can_reset()

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _proc_status("VmHWM")
        if hwm is not None:
            return hwm
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def measure(self, fn: Callable[[], object]) -> dict:
        gc.collect()
        sync(self.device)
        if self.device.type == "cpu":
            # Memory the allocator kept after earlier frees would absorb this step's allocations and hide them.
            _malloc_trim()
        self._reset()
        before = self._now()
        fn()
        sync(self.device)
        peak = self._peak()
        return {"peak_bytes": peak, "step_extra_bytes": max(0, peak - before)}


def _tensor_bytes(states: Iterable[dict]) -> tuple[int, set[int]]:
    total, ids = 0, set()
    for st in states:
        for t in st.values():
            if torch.is_tensor(t) and id(t) not in ids:
                ids.add(id(t))
                total += t.numel() * t.element_size()
    return total, ids


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(all optimizer state, state beyond the base optimizer's) in bytes; SGD has no base, so its extra is 0."""
    base = getattr(opt, "base_optimizer", None)
    if base is None:
        total, _ = _tensor_bytes(opt.state.values())
        return total, 0
    base_total, base_ids = _tensor_bytes(base.state.values())
    own = 0
    for st in opt.state.values():
        for t in st.values():
            if torch.is_tensor(t) and id(t) not in base_ids:
                own += t.numel() * t.element_size()
    return base_total + own, own

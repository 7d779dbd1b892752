"""The timing harness: wall clock around one call (synchronised on CUDA) and interleaved rounds of several calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``; on CUDA the queue is drained before and after, so the kernels count."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def round_robin(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each function once per round, in an order that rotates every round; drop the first ``warmup`` rounds.

    Interleaving is what makes ratios from one run trustworthy on a shared machine: a slow spell hits every function
    alike instead of whichever happened to run during it.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t = timed(fns[name], device)
            if r >= warmup:
                times[name].append(t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def summary(ts: list[float]) -> dict:
    """Median, fastest and every time of one timed function (noise only ever adds time: the fastest is a reading)."""
    return {"median_s": median(ts), "min_s": min(ts) if ts else float("nan"), "times_s": ts}

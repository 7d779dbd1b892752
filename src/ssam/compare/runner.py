"""Training the grid: each run a child ``ssam train`` process, at most ``jobs`` at once, one GPU per slot.

A child of its own means a crash, a divergence or a CUDA error in one run cannot take the comparison down.
SIGINT/SIGTERM stop the children cleanly (each finishes its step and writes last.pt); a lock file keeps two
comparisons out of one output folder.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..io import write_json
from ..runfolder import RunFolder
from .console import say
from .plan import Run


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_ids(device: str) -> list[str]:
    if device == "cpu":
        return []
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        return []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return (visible[:count] if visible else [str(i) for i in range(count)]) if count > 1 else []


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # Progress bars rewrite their line with carriage returns; only the last state of each line is useful.
    rows = [r.split("\r")[-1] for r in text.splitlines() if r.strip()]
    return "\n".join("    " + r for r in rows[-lines:])


def result_text(folder: Path) -> str:
    s = RunFolder(folder).summary() or {}

    def num(key: str, fmt: str) -> str:
        v = s.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "?"

    return (
        f"best {num('best_acc1', '.2f')}  final {num('final_acc1', '.2f')}  "
        f"loss {num('final_train_loss', '.4f')}  {num('time_per_epoch', '.3g')} s/epoch"
    )


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def resume_flags(action: str, overwrite: bool) -> list[str]:
    return ["--resume"] if action == "resume" else (["--overwrite"] if overwrite or action == "restart" else [])


def execute(
    todo: list[tuple[Run, str]],
    jobs: int,
    gpus: list[str],
    logs: Path,
    status: dict,
    status_path: Path,
    overwrite: bool,
) -> dict[str, int]:
    """Train ``todo`` with at most ``jobs`` children at once; returns each run's exit code."""
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, cpu_count() // max(1, min(jobs, len(todo))))
    pending = list(enumerate(todo, 1))
    active: dict[int, tuple[subprocess.Popen, Run, int, float, Any]] = {}
    free_slots = list(range(jobs))
    codes: dict[str, int] = {}
    durations: list[float] = []
    total = len(todo)
    abort = False
    try:
        while (pending and not abort) or active:
            while pending and free_slots and not abort:
                index, (run, action) = pending.pop(0)
                slot = free_slots.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                cmd = [sys.executable, "-m", "ssam.cli", "train", *run.flags, *resume_flags(action, overwrite)]
                log = open(logs / f"{run.name}.log", "a")
                log.write(f"$ {shlex.join(cmd)}\n")
                log.flush()
                # A session of its own: Ctrl-C reaches only this process, which passes exactly one SIGINT on
                # (train treats a second one as "stop now" and would lose the epoch in progress).
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
                say(f"[{index}/{total}] {'resume' if action == 'resume' else 'start '} {run.name}{where}")
                active[slot] = (proc, run, index, time.time(), log)
            time.sleep(0.2)
            for slot in list(active):
                proc, run, index, started, log = active[slot]
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del active[slot]
                free_slots.append(slot)
                elapsed = time.time() - started
                codes[run.name] = rc
                log_path = logs / f"{run.name}.log"
                if rc == 0:
                    durations.append(elapsed)
                    left = len(pending) + len(active)
                    eta = (
                        f", about {_fmt_duration(np.mean(durations) * left / jobs)} left" if left and not abort else ""
                    )
                    say(
                        f"[{index}/{total}] done   {run.name}  {result_text(run.folder)}  "
                        f"({_fmt_duration(elapsed)}{eta})"
                    )
                    status.pop(run.name, None)
                elif rc == 130:
                    say(f"[{index}/{total}] stopped {run.name}; last.pt kept, it resumes on the next run")
                elif rc == 3:
                    say(
                        f"[{index}/{total}] DIVERGED {run.name} after {_fmt_duration(elapsed)} (exit 3); see {log_path}"
                    )
                    status[run.name] = "diverged"
                else:
                    say(
                        f"[{index}/{total}] FAILED {run.name} (exit {rc}); last lines of {log_path}:\n{_tail(log_path)}"
                    )
                    if rc == 2 and not abort:
                        # Bad input fails every run the same way: stop instead of failing them one by one.
                        abort = True
                        for other, *_ in active.values():
                            other.terminate()
                write_json(status_path, status)
    except KeyboardInterrupt:
        procs = [proc for proc, *_ in active.values()]
        if procs:
            say("\nstopping: each running run finishes its step and writes last.pt (Ctrl-C again: at once)", err=True)
        _stop(procs)
        raise
    if abort:
        raise UsageError(
            "a train run rejected its arguments (exit 2, shown above); fix the flags or recipe "
            "and rerun: finished runs are kept"
        )
    return codes


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    try:
        for proc in procs:
            proc.wait(timeout=600)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the second signal: train stops without finishing the step
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def train_grid(
    runs: list[Run], actions: list[tuple[Run, str]], output: Path, jobs: int | None, status: dict, overwrite: bool
) -> dict[str, int] | None:
    """Train what is not finished; each run's exit code, or None when interrupted."""
    for r, a in actions:
        if a in ("done", "diverged"):
            say(
                f"skip   {r.name}: "
                + (result_text(r.folder) if a == "done" else f"diverged earlier (delete {r.folder} to retry)")
            )
    todo = [(r, a) for r, a in actions if a in ("new", "resume", "restart")]
    if not todo:
        return {}
    gpus = gpu_ids(runs[0].config.get("device", "auto"))
    jobs = jobs or (len(gpus) if gpus else 1)
    say(f"{len(todo)} run(s) to train, {jobs} at a time; logs in {output / 'logs'}")
    # SIGTERM (a scheduler, `kill`) stops the runs as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return execute(todo, jobs, gpus, output / "logs", status, output / "status.json", overwrite)
    except KeyboardInterrupt:
        say("interrupted: run the same command again to resume", err=True)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


class Lock:
    """One comparison per output folder: two would start the same run folders twice."""

    def __init__(self, folder: Path):
        self.path = folder / ".compare.lock"
        self.held = False

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise UsageError(
                        f"--output {self.path.parent} is in use by another ssam compare (pid {pid})"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise UsageError(f"could not lock --output {self.path.parent} ({self.path} keeps reappearing)")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

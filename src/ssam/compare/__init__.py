"""``ssam compare``: train optimizer variants x seeds x swept train flags, then tabulate and plot.

Every run is an ordinary ``ssam train`` run folder under ``OUTPUT/runs/<variant>[_<axis><value>...]_seed<seed>``
(``ssamf_s0.5_seed1234``, ``sam_rho0.05_seed1234``), trained in a child process, so that rerunning the same command
resumes an interrupted comparison: finished runs are skipped, runs with a ``last.pt`` but no finished
``summary.json`` are resumed.

Outputs in OUTPUT: ``results.md`` / ``results.csv`` (one row per variant and axis setting, mean ± sample std over
seeds, and each SAM-family row's final accuracy minus the base optimizer's, seed by seed), ``runs.csv`` (one row
per run), ``curves.png``, ``sparsity.png`` and ``rho.png`` (sweeps), ``masks.png`` (SSAM runs), ``memorization.png``
and ``cost.png`` (runs under label noise; every run's accuracy against its passes per example), ``compare.yaml``
(the resolved grid, for the record), ``logs/<run>.log`` (each child's output).

The modules, in the order ``main`` uses them: ``settings`` and ``recipe`` (what to compare), ``plan`` (the grid and
what each run folder needs), ``runner`` (training), ``measure`` (Hessian), ``report`` (statistics and files),
``tables`` and ``numbers`` (the text), ``plots`` and ``frontier`` (the figures).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from .console import say
from .measure import hessian_of_run, measure_runs
from .plan import (
    Run,
    action_for,
    grid_folder_name,
    group_label,
    is_finished,
    plan_runs,
    read_status,
    record_grid,
)
from .recipe import PAPER_SEEDS, load_recipe, seed_count, seed_list
from .report import aggregate, load_run, mean_std, report
from .runner import Lock, resume_flags, train_grid
from .settings import Settings, build_parser, resolve

__all__ = [
    "main",
    "build_parser",
    "resolve",
    "plan_runs",
    "action_for",
    "load_recipe",
    "load_run",
    "aggregate",
    "mean_std",
    "seed_list",
    "seed_count",
    "group_label",
    "grid_folder_name",
    "hessian_of_run",
    "Lock",
    "Run",
    "Settings",
    "PAPER_SEEDS",
]


def main(argv: Sequence[str] | None = None) -> int:
    s = resolve(sys.argv[1:] if argv is None else argv)
    runs = plan_runs(s)
    status = read_status(s.output)
    actions = [(r, action_for(r, status, s.overwrite)) for r in runs]
    if s.dry_run:
        print_plan(s, actions)
        return 0

    s.output.mkdir(parents=True, exist_ok=True)
    codes: dict[str, int] | None = {}
    if not s.report_only:
        with Lock(s.output):
            record_grid(s, runs)
            codes = train_grid(runs, actions, s.output, s.jobs, status, s.overwrite)
        if codes is None:
            return 130
    if s.hessian:
        measure_runs(runs, s.hessian_samples)
    report(s, runs, status)
    return exit_code(runs, codes, status)


def print_plan(s: Settings, actions: list[tuple[Run, str]]) -> None:
    axes = "".join(f" x {a.flag} {','.join(map(str, a.values))}" for a in s.axes)
    say(f"# {len(actions)} runs: {', '.join(s.opts)} x seeds {', '.join(map(str, s.seeds))}{axes}")
    for r, a in actions:
        say(f"# {r.name}: {a}")
        if a in ("new", "resume", "restart"):
            say(f"ssam train {shlex.join([*r.flags, *resume_flags(a, s.overwrite)])}")


def exit_code(runs: list[Run], codes: dict[str, int], status: dict) -> int:
    """0, or 1 when a run failed (rerun to retry), or 3 when runs diverged (the train command's own code)."""
    failed = [n for n, c in codes.items() if c not in (0, 3)]
    diverged = [r.name for r in runs if status.get(r.name) == "diverged" and not is_finished(r.folder)]
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them", err=True)
        return 1
    if diverged:
        say(f"{len(diverged)} run(s) diverged: {', '.join(diverged)}", err=True)
        return 3
    return 0

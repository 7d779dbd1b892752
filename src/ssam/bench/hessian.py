"""ssam and PyHessian timed side by side on the same work, each tool in a process of its own.

The same work: λ_max with power iteration's relative tolerance given to both (ssam runs Lanczos, whose
test is the residual ``||H y - θ y|| <= tol·|θ|``; PyHessian runs power iteration, whose test is the change of
the estimate between iterations), and the trace from exactly the same number of Rademacher samples, on
the same batches of the same model in eval mode.  Each measurement is a fresh interpreter, so that peak
memory is each tool's own; with several rounds the order alternates, since the machine may be shared.

``ssam hessian --profile`` runs it on a checkpoint (``add_profile_args``/``run_hessian_profile``, which ``ssam.cli``
adds to the analysis command, so that the analysis layer never imports the bench); ``python -m ssam.bench.hessian``
on a freshly initialised model with random data of a given shape (no data set needed), e.g. ResNet-18 on CIFAR shape.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from ..analysis.commands.common import Loader, check_positive, settings_of
from ..analysis.commands.hessian import check_and_locate
from ..analysis.trace import TRACE_METHODS
from ..errors import ArgumentParser, UsageError
from ..io import write_json

__all__ = [
    "TOOLS",
    "add_profile_args",
    "available",
    "format_profile",
    "main",
    "measure",
    "run_hessian_profile",
    "run_profile",
]


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class _Clock:
    """Wall and CPU seconds of a block.  CPU seconds of a one-thread worker barely move when other processes
    share the cores; wall seconds are what a user waits."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def record(self, out: dict, part: str) -> None:
        out[f"{part}_seconds"], out[f"{part}_cpu_seconds"] = self.wall, self.cpu


def _ssam(model: nn.Module, batches: list, spec: dict) -> dict:
    from ..analysis.eigen import hessian_eigenvalues
    from ..analysis.trace import hessian_trace

    products = [0]
    kw = dict(seed=spec["seed"], device=spec["device"], graph_memory=spec.get("graph_memory"))
    with _Clock() as clock:
        lam = hessian_eigenvalues(
            model,
            nn.CrossEntropyLoss(),
            batches,
            top_k=1,
            max_iter=spec["max_iter"],
            tol=spec["tol"],
            progress=lambda k: products.__setitem__(0, products[0] + k),
            **kw,
        )[0]
    out = {"lambda_max": lam, "products": products[0]}
    clock.record(out, "lambda")
    if spec["trace_samples"]:
        method = spec.get("trace_method", "auto")
        with _Clock() as clock:
            # tol=0: exactly trace_samples samples, as PyHessian is made to draw below.
            tr, se, n = hessian_trace(
                model,
                nn.CrossEntropyLoss(),
                batches,
                max_iter=spec["trace_samples"],
                tol=0,
                method=method,
                **kw,
            )
        out.update(trace=tr, trace_stderr=se, trace_samples=n, trace_method=method)
        clock.record(out, "trace")
    return out


def _pyhessian(model: nn.Module, batches: list, spec: dict) -> dict:
    import pyhessian  # noqa: F401  (its package attribute ``hessian`` is the class; the module is below)

    ph = sys.modules["pyhessian.hessian"]
    products = [0]
    plain = ph.hessian_vector_product

    def counted(*a: Any) -> Any:
        products[0] += 1
        return plain(*a)

    ph.hessian_vector_product = counted

    class Counted(ph.hessian):
        def dataloader_hv_product(self, v):  # the path for several batches: forward and backward every product
            products[0] += 1
            return super().dataloader_hv_product(v)

    torch.manual_seed(spec["seed"])
    one = len(batches) == 1
    with _Clock() as clock:
        # Building the object runs the forward and backward of a single batch: part of its λ_max time.
        h = Counted(
            model,
            nn.CrossEntropyLoss(),
            data=batches[0] if one else None,
            dataloader=None if one else batches,
            cuda=spec["device"] == "cuda",
        )
        lam = h.eigenvalues(maxIter=spec["max_iter"], tol=spec["tol"], top_n=1)[0][0]
    out = {"lambda_max": float(lam), "products": products[0]}
    clock.record(out, "lambda")
    if spec["trace_samples"]:
        with _Clock() as clock:
            # A tolerance of -inf never stops early: exactly trace_samples samples.
            samples = [float(v) for v in h.trace(maxIter=spec["trace_samples"], tol=float("-inf"))]
        n = len(samples)
        out.update(
            trace=statistics.fmean(samples),
            trace_stderr=statistics.stdev(samples) / n**0.5 if n > 1 else None,
            trace_samples=n,
        )
        clock.record(out, "trace")
    return out


TOOLS = {"ssam": _ssam, "pyhessian": _pyhessian}


def _version(tool: str) -> str:
    if tool == "ssam":
        from .. import __version__

        return __version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(tool)
    except PackageNotFoundError:
        return "?"


def _build(spec: dict) -> tuple[nn.Module, list]:
    """The model and batches a spec names: a checkpoint with the analysis data, or random ones of a shape."""
    source = spec["source"]
    if source.get("checkpoint"):
        loader = Loader(argparse.Namespace(**source))
        model, _, (dataset, datadir) = loader.load(source["checkpoint"])
        return model, loader.batches(dataset, datadir)
    from ..models import build_model

    torch.manual_seed(source["init_seed"])
    model = build_model(source["model"], source["num_classes"], source["in_channels"], source["image_size"])
    gen = torch.Generator().manual_seed(source["init_seed"] + 1)
    shape = (source["batch_size"], source["in_channels"], source["image_size"], source["image_size"])
    batches = [
        (
            torch.randn(shape, generator=gen),
            torch.randint(0, source["num_classes"], (source["batch_size"],), generator=gen),
        )
        for _ in range(source["num_batches"])
    ]
    return model, batches


def measure(spec: dict) -> dict:
    """One tool on one spec, in this process: times, values and memory (what a profile worker prints)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model, batches = _build(spec)
    device = torch.device(spec["device"])
    model.to(device).eval()
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    base = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = TOOLS[spec["tool"]](model, batches, spec)
    out.update(
        tool=spec["tool"],
        version=_version(spec["tool"]),
        threads=torch.get_num_threads(),
        base_rss_mib=base,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def available(tool: str) -> bool:
    if tool == "ssam":
        return True
    import importlib.util

    return importlib.util.find_spec(tool) is not None


def run_profile(
    spec: dict, tools: tuple[str, ...] = ("ssam", "pyhessian"), rounds: int = 1, echo: Any = None
) -> list[dict]:
    """Every tool once per round, each in a fresh ``python -m ssam.bench.hessian --worker``; the order
    alternates between rounds.  Returns one row per measurement (``measure``'s dict plus ``round``)."""
    rows = []
    for r in range(rounds):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            proc = subprocess.run(
                [sys.executable, "-m", "ssam.bench.hessian", "--worker"],
                input=json.dumps({**spec, "tool": tool}),
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"profile worker for {tool} failed (exit {proc.returncode}):\n" + proc.stderr[-3000:]
                )
            row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "round": r}
            rows.append(row)
            if echo is not None:
                echo(row)
    return rows


def format_profile(rows: list[dict]) -> str:
    """A markdown table of the rows (medians over rounds per tool), and the ratios ssam / PyHessian."""
    timed = ("lambda_seconds", "lambda_cpu_seconds", "trace_seconds", "trace_cpu_seconds", "peak_rss_mib")
    lines = [
        "| tool | λ_max | products | λ_max s (wall / cpu) | trace ± stderr | samples | trace s (wall / cpu) "
        "| peak RSS MiB | rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    med: dict[str, dict] = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        mine = [r for r in rows if r["tool"] == tool]
        m = {k: statistics.median(r[k] for r in mine) for k in timed if k in mine[0]}
        last = med[tool] = {**mine[-1], **m}
        trace, trace_s = "-", "-"
        if "trace" in last:
            trace = f"{last['trace']:.5g} ± {last['trace_stderr']:.2g}"
            trace_s = f"{m['trace_seconds']:.2f} / {m['trace_cpu_seconds']:.2f}"
        lines.append(
            f"| {tool} {last['version']} | {last['lambda_max']:.6g} | {last['products']} | "
            f"{m['lambda_seconds']:.2f} / {m['lambda_cpu_seconds']:.2f} | {trace} | "
            f"{last.get('trace_samples', '-')} | {trace_s} | {m['peak_rss_mib']:.0f} | {len(mine)} |"
        )
    if "ssam" in med and "pyhessian" in med:
        s, p = med["ssam"], med["pyhessian"]
        parts = [
            f"λ_max {s[k] / p[k]:.2f}x {clock}"
            for k, clock in (("lambda_seconds", "wall"), ("lambda_cpu_seconds", "cpu"))
        ]
        if "trace_seconds" in s and "trace_seconds" in p:
            parts += [
                f"trace {s[k] / p[k]:.2f}x {clock}"
                for k, clock in (("trace_seconds", "wall"), ("trace_cpu_seconds", "cpu"))
            ]
        diff = abs(s["lambda_max"] - p["lambda_max"]) / max(abs(p["lambda_max"]), 1e-30)
        lines.append(f"\nssam / PyHessian time (medians): {', '.join(parts)}; λ_max differ by {100 * diff:.2f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ ssam hessian --profile
def add_profile_args(parser: argparse.ArgumentParser) -> None:
    """The ``--profile`` flags of ``ssam hessian`` (its other flags: ``ssam.analysis.cli.add_hessian_args``)."""
    g = parser.add_argument_group("profile")
    g.add_argument(
        "--profile",
        action="store_true",
        help="instead of the analysis, time ssam and (if installed) PyHessian side by side, each in its "
        "own process: lambda_max to --tol within --max_iter products, and with --trace the trace "
        "from exactly --trace_max_iter samples; -> profile.json",
    )
    g.add_argument(
        "--profile_rounds", type=int, default=1, help="measure each tool this many times, alternating which goes first"
    )


def _spec(args: argparse.Namespace, source_keys: tuple[str, ...], trace_samples: int, device: str, **extra) -> dict:
    """What a worker measures: the model and data (``source``), and the same settings for every tool."""
    return {
        "source": {k: getattr(args, k) for k in source_keys},
        "tol": args.tol,
        "max_iter": args.max_iter,
        "trace_samples": trace_samples,
        "seed": args.seed,
        "device": device,
        "trace_method": args.trace_method,
        **extra,
    }


def run_hessian_profile(args: argparse.Namespace) -> int:
    """``ssam hessian --profile``: both tools on the checkpoint's analysis data; writes ``profile.json``."""
    check_positive(args, "profile_rounds")
    graph_memory, device, out = check_and_locate(args)
    if args.params or args.density or args.per_layer:
        raise UsageError(
            "--profile times lambda_max (and --trace) on all parameters; leave out --params, --density and --per_layer"
        )
    # Read here first: a bad checkpoint is one line and exit 2, not a failed worker process.
    Loader(args).check([args.checkpoint])
    tools = ("ssam", "pyhessian") if available("pyhessian") else ("ssam",)
    if len(tools) == 1:
        print("ssam: note: PyHessian is not installed (pip install pyhessian); timing ssam alone", file=sys.stderr)
    source_keys = ("checkpoint", "dataset", "datadir", "model", "num_samples", "batch_size", "data_seed")
    trace_samples = args.trace_max_iter if args.trace else 0
    spec = _spec(args, source_keys, trace_samples, device.type, graph_memory=graph_memory)
    rows = run_profile(spec, tools, args.profile_rounds)
    table = format_profile(rows)
    print(table)
    write_json(out / "profile.json", {"settings": settings_of(args), "spec": spec, "rows": rows, "table": table})
    print(f"wrote {out / 'profile.json'}")
    return 0


# ------------------------------------------------------------------------------ python -m ssam.bench.hessian
def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m ssam.bench.hessian",
        description="ssam and PyHessian side by side on a freshly initialised model with random data",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--in_channels", type=int, default=3)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_batches", type=int, default=1)
    p.add_argument("--init_seed", type=int, default=0, help="seed of the weights and of the random data")
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of λ_max for both tools")
    p.add_argument("--max_iter", type=int, default=100, help="at most this many products for λ_max")
    p.add_argument("--trace_samples", type=int, default=32, help="Rademacher samples of the trace (0: no trace)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    p.add_argument("--trace_method", default="auto", choices=TRACE_METHODS, help="how ssam computes each trace sample")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    p.add_argument("--rounds", type=int, default=1, help="each tool this many times, alternating the order")
    p.add_argument("--tools", default="ssam,pyhessian")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(sys.stdin.read()))))
        return 0
    tools = tuple(t for t in args.tools.split(",") if t)
    for t in tools:
        if t not in TOOLS:
            raise UsageError(f"--tools: got {t!r}; allowed: a comma-separated subset of {', '.join(TOOLS)}")
        if not available(t):
            raise UsageError(f"--tools: {t} is not installed (pip install {t})")
    source_keys = ("model", "num_classes", "in_channels", "image_size", "batch_size", "num_batches", "init_seed")
    spec = _spec(args, source_keys, args.trace_samples, args.device, threads=args.threads)
    rows = run_profile(spec, tools, args.rounds, echo=lambda r: print(json.dumps(r), file=sys.stderr))
    print(format_profile(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"ssam.bench.hessian: {e}", file=sys.stderr)
        sys.exit(2)

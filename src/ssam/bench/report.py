"""What a run says about itself (machine, load) and the printed tables of the main section."""

from __future__ import annotations

import datetime
import os
import platform

import torch

from .args import OPTIMIZERS, TIMED_FISHER_METHODS


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    return env


def fmt_s(t: float | None) -> str:
    return f"{t * 1e3:9.1f} ms" if t is not None and t == t else "      n/a"


def header(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    return (
        f"ssam bench: {cfg['model']} on {cfg['dataset']} {tuple(cfg['input_shape'])}, batch {cfg['batch_size']}, "
        f"{env['device']} ({env['device_name']}), torch {env['torch']}, {env['cpu_count']} CPUs"
    )


def format_main(report: dict) -> list[str]:
    lines = [
        f"{'optimizer':10s} {'step':>12s} {'img/s':>9s} {'opt only':>12s} {'% SAM':>7s} "
        f"{'peak MiB':>9s} {'step MiB':>8s} {'extra B/param':>14s}",
    ]
    for name in OPTIMIZERS:
        st, oo, mem = report["steps"][name], report["optimizer_only"][name], report["memory"][name]
        lines.append(
            f"{name:10s} {fmt_s(st['median_s']):>12s} {st['images_per_s'] or 0:9.1f} "
            f"{fmt_s(oo['median_s']):>12s} {oo['pct_of_sam_step']:6.2f}% "
            f"{mem['peak_bytes'] / 2**20:9.1f} {mem['step_extra_bytes'] / 2**20:8.1f} "
            f"{mem['extra_state_bytes_per_param']:14.2f}"
        )
    r = report["ratios"]
    q = report["ratios_of_min"]
    lines += [
        "",
        f"medians:  SAM/SGD {r['SAM/SGD']:.3f}   SSAM-F/SAM {r['SSAM-F/SAM']:.3f}   SSAM-D/SAM {r['SSAM-D/SAM']:.3f}",
        f"fastest:  SAM/SGD {q['SAM/SGD']:.3f}   SSAM-F/SAM {q['SSAM-F/SAM']:.3f}   SSAM-D/SAM {q['SSAM-D/SAM']:.3f}",
        "",
        "mask updates (x one SGD step):",
    ]
    fisher = report["mask_update"]["SSAM-F"]
    for method in TIMED_FISHER_METHODS:
        row = fisher.get(method)
        if row is None:
            continue
        if "skipped" in row:
            lines.append(f"  SSAM-F {method:5s} skipped: {row['skipped']}")
        else:
            lines.append(
                f"  SSAM-F {method:5s} {fisher['num_samples']} examples {fmt_s(row['seconds'])}"
                f"  {row['sgd_steps']:6.2f}x"
            )
    lines.append(f"  SSAM-F auto = {fisher['auto']}")
    d = report["mask_update"]["SSAM-D"]
    lines.append(f"  SSAM-D       {fmt_s(d['median_s'])}  {d['sgd_steps']:6.3f}x")
    tp = report.get("throughput", {})
    if "skipped" not in tp:
        lines += ["", "images/s: " + "  ".join(f"{n:>8s}" for n in OPTIMIZERS)]
        for label, row in tp.items():
            if "skipped" in row:
                lines.append(f"  {label}: skipped ({row['skipped'][:120]})")
            else:
                lines.append(f"  {label:28s} " + "  ".join(f"{row[n]:8.0f}" for n in OPTIMIZERS))
    dl = report.get("data_loader", {})
    if "skipped" not in dl:
        lines += [
            "",
            f"loaders ({dl['workers']} workers): DataLoader {dl['DataLoader']['images_per_s']:.0f} img/s, "
            f"GPULoader {dl['GPULoader']['images_per_s']:.0f} img/s ({dl['speedup']:.1f}x)",
        ]
    return lines

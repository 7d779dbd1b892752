"""Helpers shared by the integration tests: run an example script, load one as a module."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "integrations"


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    """Run examples/integrations/NAME as a user would (its own process, no network) and return its stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def load_example(name: str):
    """Import examples/integrations/NAME as a module (for its model and data builders)."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def last_value(out: str, prefix: str) -> list[float]:
    """The numbers ending the lines of ``out`` that start with ``prefix``."""
    return [float(line.split()[-1]) for line in out.splitlines() if line.startswith(prefix)]

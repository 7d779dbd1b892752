"""The README's loops are the files in examples/: each runs, and the README shows exactly its [readme] region."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


def readme_region(path: Path) -> str:
    text = path.read_text()
    m = re.search(r"^# \[readme\]\n(.*?)^# \[/readme\]\n", text, flags=re.S | re.M)
    assert m, f"{path.name} has no '# [readme]' ... '# [/readme]' region"
    return m.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    proc = subprocess.run([sys.executable, path.name], cwd=path.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "an example prints what it did"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_readme_shows_example(path):
    region = readme_region(path)
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{region}```" in readme, f"README does not show the [readme] region of examples/{path.name}"

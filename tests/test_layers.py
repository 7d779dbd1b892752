"""The package reads top-down: a module imports only from its own layer or the layers below it.

Checked on the source (every ``import``, also the deferred ones inside functions), so that a new upward import
fails here rather than as an import cycle somewhere else. Entry points (``__main__``) and the deprecated shims,
which reach a moved name only when it is used, are the stated exceptions."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ssam"

# Lowest first; a module may import its own layer and any layer before it.
LAYERS = [
    {"errors", "io", "extras", "runfolder"},
    {"optim"},
    {"data"},
    {"models"},
    {"checkpoint"},
    {"train"},
    {"analysis"},
    {"compare"},
    {"bench"},
    {"integrations"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Deprecated names kept for one release: each forwards to the new home lazily, with a warning (none since 0.2).
SHIMS: set[str] = set()


def _imports(source: str, rel: Path) -> list[tuple[int, list[str]]]:
    """(line, absolute module path) of every ssam import in the source of ``ssam/<rel>``."""
    package = ["ssam", *rel.parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] == "ssam":
                names = [a.name for a in node.names] if len(target) == 1 else [None]
                found += [(node.lineno, target + ([n] if n else [])) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")) for a in node.names if a.name.split(".")[0] == "ssam"]
    return found


def _layer(parts: list[str]) -> str:
    return parts[0].removesuffix(".py")


def test_every_module_is_in_a_layer():
    tops = {_layer(p.relative_to(SRC).parts) for p in SRC.rglob("*.py")}
    assert tops <= set(RANK), f"modules of no layer: {sorted(tops - set(RANK))}; add them to LAYERS"


def _upward(source: str, rel: Path) -> list[str]:
    """Each import of ``ssam/<rel>`` that reaches a layer above its own, as ``file:line module``."""
    if rel.name == "__main__.py" or rel.as_posix() in SHIMS:
        return []
    mine, bad = RANK[_layer(rel.parts)], []
    for line, target in _imports(source, rel):
        if len(target) < 2 or target[1] == "__version__":
            continue
        theirs = RANK.get(target[1].removesuffix(".py"), len(LAYERS))
        if theirs > mine:
            bad.append(f"{rel}:{line} {'.'.join(target)}")
    return bad


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_import(path):
    bad = _upward(path.read_text(), path.relative_to(SRC))
    assert not bad, f"imports from a layer above: {bad}"


def test_the_check_sees_an_upward_import():
    """The scan is not vacuous: a deferred import of the bench inside an analysis function is reported, and the
    same line in the bench is not."""
    source = "import torch\n\n\ndef f():\n    from ..bench import hessian\n    from ..optim import SAM\n"
    assert _upward(source, Path("analysis/x.py")) == ["analysis/x.py:5 ssam.bench"]
    assert _upward(source, Path("bench/x.py")) == []
    assert _upward("from ssam.compare import main\n", Path("train/y.py")) == ["train/y.py:1 ssam.compare"]

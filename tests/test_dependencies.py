"""pyproject.toml declares every third-party package the code imports, and the installed versions
satisfy the declared ranges (so the ranges admit the torch and torchvision builds we test on)."""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["lightning_modules", "datamodules", "callbacks", "train.py"]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _imported_top_level_names() -> dict[str, set[str]]:
    """Top-level name of every absolute import (also those inside functions) -> the files importing it."""
    files = [p for s in SOURCES for p in ([REPO / s] if s.endswith(".py") else (REPO / s).rglob("*.py"))]
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    first_party = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    imported = {name: files for name, files in _imported_top_level_names().items()
                if name not in sys.stdlib_module_names and name not in first_party and name != "__future__"}
    # the installed distributions say which package provides an import name (PIL -> pillow, yaml -> PyYAML)
    provided_by = metadata.packages_distributions()
    assert {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}.items() <= {
        name: _normalize(provided_by[name][0]) for name in ("PIL", "yaml", "sklearn")}.items()
    declared = {_normalize(Requirement(r).name) for r in _project()["dependencies"]}
    missing = {name: sorted(files) for name, files in imported.items()
               if not {_normalize(d) for d in provided_by.get(name, [name])} & declared}
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"
    assert {"torch", "lightning", "numpy", "PIL", "yaml", "timm", "faster_coco_eval"} <= set(imported)


def test_installed_versions_satisfy_the_declared_ranges_and_tensorboard_is_an_extra():
    project = _project()
    requirements = [Requirement(r) for r in project["dependencies"]]
    for requirement in requirements:
        version = metadata.version(requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes installed {version}"
    assert {"torch", "torchvision"} <= {_normalize(r.name) for r in requirements}
    extras = project["optional-dependencies"]
    assert [_normalize(Requirement(r).name) for r in extras["tensorboard"]] == ["tensorboard"]

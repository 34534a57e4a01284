"""The library's shape: `cnn` imports neither Prefect nor MLflow, and scoring does not load the training engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cnn


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_library_never_imports_the_orchestration() -> None:
    modules = ", ".join(f"cnn.{p.stem}" for p in sorted(Path(cnn.__file__).parent.glob("*.py")) if p.stem != "__init__")
    loaded = _modules_after(f"import {modules}")
    assert "cnn.model.train" in loaded and not {m for m in loaded if m.split(".")[0] in ("prefect", "mlflow", "flows")}


def test_scoring_does_not_import_the_training_module() -> None:
    loaded = _modules_after("import cnn.batch.scoring, cnn.evaluation, cnn.inference")
    assert "cnn.model.train" not in loaded and "cnn.model.runtime" in loaded and "cnn.model.precision" in loaded


def test_no_module_shadows_the_standard_library() -> None:
    """Prefect runs a flow file as a script, which puts its folder first on sys.path: a `flows/secrets.py` was
    imported as the standard `secrets` by numpy in the decode workers, and every file failed to decode."""
    import sys

    root = Path(__file__).parents[2]
    ours = {p.stem for package in ("cnn", "flows") for p in (root / package).glob("*.py")}
    assert not ours & set(sys.stdlib_module_names)

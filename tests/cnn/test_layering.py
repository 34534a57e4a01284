"""The library's shape: `cnn` imports neither Prefect nor MLflow; its subpackages import only downwards (no cycle);
imports inside functions are for heavy optional dependencies only and say why; modules stay readable."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import cnn

ROOT = Path(cnn.__file__).parent
# Lowest first: a module may import its own layer's modules and those of lower layers, never a higher one.
LAYERS = [
    {"cnn", "cnn.errors", "cnn.choices", "cnn.limits", "cnn.fsio", "cnn.stopping", "cnn.formats"},
    {"cnn.io"},
    {"cnn.metrics"},
    {"cnn.config"},
    {"cnn.data"},
    {"cnn.model"},
    {"cnn.infer"},
    {"cnn.trust"},
    {"cnn.similarity"},
    {"cnn.batch"},
    {"cnn.review"},
]


def _modules() -> dict[str, Path]:
    found = {"cnn": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], "cnn."):
        path = ROOT.joinpath(*info.name.split(".")[1:])
        found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


def _layer(module: str) -> int:
    for depth in (2, 1):
        prefix = ".".join(module.split(".")[:depth])
        for i, layer in enumerate(LAYERS):
            if module in layer or prefix in layer:
                return i
    raise AssertionError(f"{module} is in no layer of tests/cnn/test_layering.py")


def _imports(path: Path) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, imported cnn module or package, inside a function) for every import of our own modules."""
    tree = ast.parse(path.read_text())
    inside = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cnn":
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(node, n if n in _modules() else node.module, id(node) in inside) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node, a.name, id(node) in inside) for a in node.names if a.name.split(".")[0] == "cnn"]
    return found


def test_every_import_goes_down_the_layers_and_none_hides_in_a_function() -> None:
    upward, hidden = [], []
    for module, path in _modules().items():
        for node, target, in_function in _imports(path):
            if _layer(target) > _layer(module):
                upward.append(f"{module} imports {target} (line {node.lineno})")
            if in_function:
                hidden.append(f"{module} imports {target} inside a function (line {node.lineno})")
    assert not upward and not hidden, upward + hidden


def test_no_import_cycle_between_modules() -> None:
    graph = {m: {t for _, t, _ in _imports(p) if t in _modules() and t != m} for m, p in _modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_imports_inside_functions_say_why() -> None:
    """An import in a function is for a heavy optional dependency (faiss, grad-cam, pydicom...): a comment on the
    line above the function's first import says which, so nobody moves it to the top by habit."""
    silent = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            imports = [n for n in ast.walk(function) if isinstance(n, ast.Import | ast.ImportFrom)]
            if imports:
                first = min(n.lineno for n in imports)
                if not lines[first - 2].strip().startswith("#"):
                    silent.append(f"{module}.{function.name} (line {first})")
    assert not silent, silent


def test_modules_stay_readable() -> None:
    top = [p.name for p in ROOT.glob("*.py")]
    assert len(top) <= 12, top
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_library_never_imports_the_orchestration() -> None:
    loaded = _modules_after("import " + ", ".join(sorted(_modules())))
    assert "cnn.model.train" in loaded and not {m for m in loaded if m.split(".")[0] in ("prefect", "mlflow", "flows")}


def test_scoring_does_not_import_the_training_engine() -> None:
    loaded = _modules_after("import cnn.batch.shard, cnn.batch.plan, cnn.batch.sinks, cnn.trust.evaluation")
    assert "cnn.model.train" not in loaded and "cnn.model.runtime" in loaded and "cnn.model.run" in loaded


def test_no_module_shadows_the_standard_library() -> None:
    """Prefect runs a flow file as a script, which puts its folder first on sys.path: a `flows/secrets.py` was
    imported as the standard `secrets` by numpy in the decode workers, and every file failed to decode."""
    root = Path(__file__).parents[2]
    ours = {p.stem for package in ("cnn", "flows") for p in (root / package).rglob("*.py")}
    assert not ours & set(sys.stdlib_module_names)

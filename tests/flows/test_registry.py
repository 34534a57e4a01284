"""The promotion gate against a real MLflow store: digests recorded and checked on every load, a paired test that
ties and noise cannot pass, a floor, other tasks held back unless replaced on purpose, and a gate that cannot
decide leaving the version tagged `gate_failed`, never looking like a candidate."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from cnn.config import IngestOptions
from cnn.data.ingest import ingest
from flows.cli import app
from tests.helpers import aliases, pattern_dataset, tiny_config, workspace_env, write_patterns

runner = CliRunner()
pytestmark = pytest.mark.slow
# fp32 whatever the host: under `auto` a CPU with native bf16 times bf16 steps against fp32 for each training, and on
# a loaded host two trainings of the same seed could choose differently (the tie below would then be no tie)
FAST = ["--epochs", "2", "--batch-size", "16", "--lr", "0.003", "--precision", "fp32"]


@pytest.fixture(scope="module")
def home(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from flows import workspace

    with workspace_env(tmp_path_factory.mktemp("gate") / "home") as home:
        workspace.configure()
        pattern_dataset(home)
        tiny_config(home.parent / "fast.yaml")
        yield home


def _train(home: Path, *args: str) -> str:
    result = runner.invoke(app, ["train", "--config", str(home.parent / "fast.yaml"), *FAST, *args])
    return f"{result.exit_code}\n{result.output}"


def _tags(version: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_model_version("patterns", version).tags)


def test_the_gate_decides_on_evidence_and_records_it(home: Path) -> None:
    first = _train(home, "--dataset", "patterns")
    assert first.startswith("0\n") and "no champion yet" in first, first
    tags = _tags("1")
    assert len(tags["weights.sha256"]) == 64 and len(tags["contract.sha256"]) == 64

    same = _train(home, "--dataset", "patterns")  # the same seed and data: the same predictions, a tie
    assert same.startswith("0\n") and "@challenger" in same and "not shown better" in same, same
    tags = _tags("2")
    assert tags["gate.test"].startswith("paired bootstrap") and float(tags["gate.p_value"]) == 1.0
    assert len(tags["gate.images_sha256"]) == 64
    assert aliases("patterns") == {"champion": "1", "challenger": "2"}

    poor = _train(home, "--dataset", "patterns", "--epochs", "1", "--lr", "0.00001", "--gate-min-score", "0.9")
    assert "@challenger" in poor and "below the floor gate_min_score 0.9" in poor, poor

    # the gate checks operating points first; one that holds (any sensitivity is >= 0) does not change the verdict
    point = ["--operating-point", "horizontal:sensitivity>=0.0", "--gate-operating-points"]
    checked = _train(home, "--dataset", "patterns", "--epochs", "1", "--lr", "0.00001", *point)
    assert "@challenger" in checked and "not shown better" in checked and "do not hold" not in checked, checked


def test_an_operating_point_that_does_not_hold_on_test_holds_the_version_back() -> None:
    import numpy as np

    from cnn.metrics.classification import SplitScores
    from cnn.metrics.operating_points import OperatingPoint
    from cnn.model.contract import ModelContract
    from flows.registry import _failing_points

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    p = np.clip(0.3 * labels + rng.uniform(0, 0.7, 400), 0, 1)
    scores = SplitScores("test", ["normal", "tumour"], np.stack([1 - p, p], 1), labels, [str(i) for i in range(400)])
    contract = ModelContract("small_cnn", ["normal", "tumour"], 1, 24, "pad", [0.5], [0.25])
    strict = OperatingPoint("tumour", "sensitivity", 0.95, 0.35, True)  # catches about 90% of tumours here
    loose = OperatingPoint("tumour", "sensitivity", 0.5, 0.35, True)
    contract.operating_points = [loose.to_dict()]
    assert _failing_points(scores, contract) == []
    contract.operating_points = [strict.to_dict()]
    [failing] = _failing_points(scores, contract)
    assert failing.startswith("tumour:sensitivity>=0.95") and "does NOT hold" in failing


def test_another_task_is_held_back_unless_it_replaces_the_champion_on_purpose(home: Path) -> None:
    two = write_patterns(home.parent / "two-src", per_class=30, seed=3)
    shutil.rmtree(two / "checker")
    ingest(two, home / "datasets" / "two", IngestOptions(image_size=24, channels=1, decode_workers=1))
    held = _train(home, "--dataset", "two", "--register-as", "patterns")
    assert held.startswith("0\n") and "@challenger" in held and "trained on another task" in held, held
    assert "--replace-task" in held and aliases("patterns")["champion"] == "1"
    replaced = _train(home, "--dataset", "two", "--register-as", "patterns", "--replace-task")
    assert "@champion" in replaced and "replaces the task" in replaced, replaced


def test_an_undefined_metric_never_crowns_and_tags_the_version(home: Path) -> None:
    source = home.parent / "one-class-test"
    for split in ("train", "val"):
        write_patterns(source / split, per_class=12, seed=len(split))
    write_patterns(home.parent / "tmp-test", per_class=6, seed=9)
    shutil.copytree(home.parent / "tmp-test" / "checker", source / "test" / "checker")
    ingest(source, home / "datasets" / "onetest", IngestOptions(image_size=24, channels=1, decode_workers=1))
    result = _train(home, "--dataset", "onetest", "--register-as", "auroc", "--config", str(_auroc_config(home)))
    assert result.startswith("2\n") and "auroc_macro of auroc v1" in result and "undefined" in result, result
    assert "Traceback" not in result
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    assert client.get_model_version("auroc", "1").tags["gate.decision"] == "gate_failed"
    assert not client.get_registered_model("auroc").aliases  # neither champion nor challenger


def _auroc_config(home: Path) -> Path:
    path = home.parent / "auroc.yaml"
    path.write_text((home.parent / "fast.yaml").read_text() + "gate_metric: auroc_macro\n")
    return path


def test_a_changed_artifact_is_refused_and_a_changed_local_copy_fetched_again(home: Path) -> None:
    from cnn.errors import UserError
    from cnn.fsio import sha256_file
    from flows import versions

    loaded = versions.load("patterns", "1")
    local = next((home / "models" / "patterns").glob("1-*"))
    weights = next(local.rglob("best.pt"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # the local copy changed: fetched again, and it loads
    assert versions.load("patterns", "1").contract == loaded.contract

    recorded = _tags("1")["weights.sha256"]
    stored = next(p for p in (home / "mlartifacts").rglob("best.pt") if sha256_file(p) == recorded)
    stored.write_bytes(stored.read_bytes()[:-1] + b"\1")
    shutil.rmtree(local)
    with pytest.raises(UserError, match=r"model patterns v1: its files do not match the sha256 digests"):
        versions.load("patterns", "1")
    incoming = write_patterns(home.parent / "incoming", per_class=1)
    scored = runner.invoke(app, ["score", str(incoming), "--model", "patterns:1", "--output", "x.csv"])
    assert scored.exit_code == 2 and "do not match the sha256" in scored.output


class _Pickled(mlflow.pyfunc.PythonModel):
    """A python_model MLflow stores with cloudpickle (what a rewritten MLmodel could point at)."""

    def predict(self, context: object, model_input: object, params: object = None) -> object:
        return model_input


def test_the_workspace_refuses_pickled_models_unless_the_user_allows_them(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    from flows import workspace

    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    mlflow.pyfunc.save_model(tmp_path / "pickled", python_model=_Pickled())
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        mlflow.pyfunc.load_model(str(tmp_path / "pickled"))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # the user's own setting wins
    workspace.configure()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"


def test_the_same_dataset_name_re_ingested_as_another_modality_is_another_task(home: Path) -> None:
    source = write_patterns(home.parent / "modal-src", per_class=20, seed=5)
    ingest(source, home / "datasets" / "modal", IngestOptions(image_size=24, channels=3, decode_workers=1))
    first = _train(home, "--dataset", "modal")
    assert "@champion" in first, first
    ingest(source, home / "datasets" / "modal", IngestOptions(image_size=24, channels=1, decode_workers=1))
    second = _train(home, "--dataset", "modal")  # same name, same classes, grayscale now
    assert "@challenger" in second and "trained on another task" in second and "channels 1" in second, second
    assert aliases("modal")["champion"] == "1"


def _store_copy(home: Path, name: str, relative: str) -> Path:
    """The registry store's file `relative` of the only logged model that holds one (what an attacker would edit)."""
    found = [p for p in (home / "mlartifacts").rglob(relative) if p.is_file() and "models" in p.parts]
    assert found, relative
    return found[-1]


def test_a_version_without_its_digest_manifest_is_refused_not_trusted(home: Path) -> None:
    from mlflow.tracking import MlflowClient

    from cnn.errors import UserError
    from flows import versions

    assert "@champion" in _train(home, "--dataset", "patterns", "--register-as", "bare")
    client = MlflowClient()
    for tag in ("files.sha256", "contract.sha256"):  # the probe's way in: drop the tags, swap the classes
        client.delete_model_version_tag("bare", "1", tag)
    contract = _store_copy(home, "bare", "contract.json")
    contract.write_text(contract.read_text().replace('"checker"', '"zzz"'))
    shutil.rmtree(home / "models" / "bare", ignore_errors=True)
    with pytest.raises(UserError, match=r"bare v1 has no digest manifest"):
        versions.load("bare", "1")
    scored = runner.invoke(app, ["score", str(home.parent / "pattern-src"), "--model", "bare", "--output", "b.csv"])
    assert scored.exit_code == 2 and "no digest manifest" in scored.output and "Traceback" not in scored.output


@pytest.mark.parametrize(
    "relative", ["artifacts/reference/train_rows.parquet", "artifacts/reference/reuse.json", "code/cnn/__init__.py"]
)
def test_a_changed_reference_or_code_file_is_refused_by_every_loader(home: Path, relative: str) -> None:
    from mlflow.exceptions import MlflowException

    from cnn.errors import UserError
    from flows import versions

    name = "cover" + str(abs(hash(relative)) % 1000)
    assert "@champion" in _train(home, "--dataset", "patterns", "--register-as", name)
    stored = next(
        p for p in (home / "mlartifacts").rglob(Path(relative).name) if p.as_posix().endswith(relative)
        and _logged_by(p, name)
    )  # fmt: skip
    stored.write_bytes(stored.read_bytes() + b"\n")
    shutil.rmtree(home / "models" / name, ignore_errors=True)
    with pytest.raises(UserError, match="do not match the sha256 digests"):
        versions.load(name, "1")
    with pytest.raises(MlflowException, match="do not match the digest recorded at registration"):
        mlflow.pyfunc.load_model(f"models:/{name}@champion")  # the README's route: checked before the code runs
    with pytest.raises(UserError, match="do not match the sha256 digests"):
        versions.load_pyfunc(f"{name}@champion")


def _logged_by(path: Path, model: str) -> bool:
    """Whether `path` lies in the logged model that version 1 of `model` was registered from."""
    from mlflow.tracking import MlflowClient

    source = MlflowClient().get_model_version(model, "1").source  # models:/m-<id>
    return source.rsplit("/", 1)[-1] in path.parts

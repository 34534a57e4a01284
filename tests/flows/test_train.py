"""`cnn train` through Prefect into a real MLflow SQLite store: tracking, registry gate, promote, rollback,
and the registered pyfunc agreeing with the engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.helpers import (
    aliases,
    api_json,
    clean_env,
    free_port,
    pattern_dataset,
    pattern_image,
    tiny_config,
    wait_until_up,
    workspace_env,
    write_dicom,
)

runner = CliRunner()
EPOCHS = ["--epochs", "3", "--batch-size", "16", "--lr", "0.003"]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn_home(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One workspace for the module: the tests read what the first training wrote (the gate test, last, adds to it)."""
    with workspace_env(tmp_path_factory.mktemp("training") / "home") as home:
        yield home


@pytest.fixture(scope="module")
def trained(cnn_home: Path) -> Path:
    from flows import workspace

    workspace.configure()
    pattern_dataset(cnn_home)
    config = cnn_home.parent / "fast.yaml"
    tiny_config(config, warmup_epochs=0.5)
    trust = ["--operating-point", "horizontal:sensitivity>=0.9", "--intended-use", "Sorting test patterns."]
    result = runner.invoke(app, ["train", "--dataset", "patterns", "--config", str(config), *EPOCHS, *trust])
    assert result.exit_code == 0, result.output
    assert "@champion" in result.output and "no champion yet" in result.output
    return config


def test_what_mlflow_keeps_names_no_path_of_the_host(trained: Path, cnn_home: Path) -> None:
    """The logged model's MLmodel, the dataset's record and every other artifact the training wrote hold paths
    relative to the model or the source, never the workspace's or the project's absolute paths (MLflow's own
    store keeps where its artifact folder is, which is the store's configuration, not shared content)."""
    roots = [str(cnn_home.parent), str(Path(__file__).parents[2]), sys.prefix]
    artifacts = [p for p in (cnn_home / "mlartifacts").rglob("*") if p.is_file() and p.suffix != ".pyc"]
    assert any(p.name == "MLmodel" for p in artifacts) and any(p.name == "dataset.json" for p in artifacts)
    hits = [str(p.relative_to(cnn_home)) for p in artifacts if any(r.encode() in p.read_bytes() for r in roots)]
    assert not hits, hits


def test_training_is_tracked_in_mlflow(trained: Path, cnn_home: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{cnn_home / 'mlflow.db'}"
    client = MlflowClient()
    version = client.get_model_version_by_alias("patterns", "champion")
    run = client.get_run(version.run_id)
    assert run.data.params["model"] == "small_cnn" and run.data.params["model_options.filters"] == "[8, 16]"
    assert run.data.params["epochs"] == "3"
    assert {"test_macro_f1", "test_accuracy", "val_macro_f1", "train_loss", "best_epoch"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_macro_f1")) == 3  # one point per epoch
    assert run.data.tags["torch.version"] and run.data.tags["dataset.manifest_sha256"]
    artifacts = {
        a.path for folder in ("evaluation", "config", "dataset") for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "evaluation/test_confusion_matrix.png",
        "evaluation/test_roc.png",
        "evaluation/test_reliability.png",
        "evaluation/training_curves.png",
        "evaluation/test_classification_report.txt",
        "config/config.yaml",
        "config/augmentation_policy.json",
        "dataset/report.md",
        "dataset/manifest_digest.json",
    } <= artifacts
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "patterns"
    assert str(cnn_home / "mlartifacts") in mlflow.get_experiment(run.info.experiment_id).artifact_location
    assert version.tags["gate.decision"] == "champion"


def test_pyfunc_from_registry_agrees_with_the_engine(trained: Path, cnn_home: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cnn.data.dataset import Dataset
    from cnn.data.loaders import load_split
    from cnn.infer.predictor import Predictor
    from cnn.model.contract import ModelContract

    version = MlflowClient().get_model_version_by_alias("patterns", "champion")
    run_dir = next((cnn_home / "runs" / "patterns").iterdir())
    contract = ModelContract.load(run_dir / "contract.json")
    dataset = Dataset(cnn_home / "datasets" / "patterns")
    split = load_split(dataset, "test", contract.classes)
    cached = split.read_images()
    engine = Predictor.load(run_dir / "best.pt", contract).predict_arrays(cached).argmax(axis=1)
    engine_labels = [contract.classes[i] for i in engine]

    pyfunc = mlflow.pyfunc.load_model("models:/patterns@champion")
    frame = pyfunc.predict(pd.DataFrame({"path": split.paths + [str(tmp_path / "missing.png")]}))
    assert frame["label"].tolist()[:-1] == engine_labels
    # calibrated like the engine (the contract's temperature), with the operating point's decision
    engine_probs = Predictor.load(run_dir / "best.pt", contract).predict_arrays(cached)
    pyfunc_probs = frame[[f"prob_{c}" for c in contract.classes]].to_numpy()[:-1]
    assert contract.temperature != 1.0 and np.allclose(pyfunc_probs, engine_probs, atol=1e-5)
    horizontal = contract.classes.index("horizontal")
    fires = engine_probs[:, horizontal] >= contract.points()[0].threshold
    assert (frame["decision"].iloc[:-1][fires] == "horizontal").all()
    assert frame["error"].iloc[-1] == "file not found" and frame["error"].iloc[:-1].isna().all()
    probs = frame[[f"prob_{c}" for c in contract.classes]].to_numpy()[:-1]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert str(version.version) == "1"
    raw = [Path(p).read_bytes() for p in split.paths[:3]]
    from_bytes = pyfunc.predict(pd.DataFrame({"image": raw}))
    assert from_bytes["label"].tolist() == engine_labels[:3]

    csv = tmp_path / "paths.csv"
    pd.DataFrame({"path": split.paths[:5]}).to_csv(csv, index=False)
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "models",
            "predict",
            "-m",
            "models:/patterns@champion",
            "--env-manager",
            "local",
            "-i",
            str(csv),
            "-t",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    strict = json.JSONDecoder(parse_constant=lambda c: pytest.fail(f"{c} in the predictions is not JSON"))
    payload = strict.decode(out.stdout.strip().splitlines()[-1])
    assert [row["label"] for row in payload["predictions"]] == engine_labels[:5]
    assert all(row["error"] is None for row in payload["predictions"])


def test_calibration_operating_points_and_the_model_card(trained: Path, cnn_home: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cnn.model.contract import ModelContract
    from flows import versions

    client = MlflowClient()
    version = client.get_model_version_by_alias("patterns", "champion")
    run = client.get_run(version.run_id)
    contract = versions.load("patterns", str(version.version)).contract  # what the registry serves
    assert contract.temperature == run.data.metrics["calibration.temperature"] and contract.temperature > 0
    [point] = contract.points()
    assert point.class_name == "horizontal" and point.val["sensitivity"] >= 0.9
    test = point.test["sensitivity"]  # the test split's figures, kept in the contract too
    assert (
        test["low"] <= test["value"] <= test["high"]
        and test["value"] == run.data.metrics["test_op.horizontal.sensitivity"]
    )
    assert run.data.metrics["operating_point.horizontal.threshold"] == point.threshold
    assert {"test_op.horizontal.sensitivity", "test_op.horizontal.sensitivity_low"} <= set(run.data.metrics)
    run_dir = next((cnn_home / "runs" / "patterns").iterdir())
    assert ModelContract.load(run_dir / "contract.json") == contract
    artifacts = {
        a.path for folder in ("evaluation", "model_card") for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "evaluation/calibration.json",
        "evaluation/test_explanations.png",
        "evaluation/test_operating_points.json",
        "evaluation/test_intervals.json",
        "model_card/card.md",
        "model_card/card.json",
    } <= artifacts
    card = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/model_card/card.json")
    assert card["version"] == "1" and card["intended_use"] == "Sorting test patterns."
    assert card["gate"]["decision"] == "champion" and card["operating_points"][0]["point"]["class_name"] == "horizontal"
    assert card["data"]["counts"]["checker"]["train"] > 0 and len(card["data"]["manifest_sha256"]) == 64
    assert set(card["per_class"]) == {"checker", "horizontal", "vertical"}
    assert str(cnn_home) not in json.dumps(card)  # shared: no absolute path
    assert version.description.startswith("# Model card: patterns v1") and len(version.description) <= 5000
    printed = runner.invoke(app, ["card", "patterns@champion"])
    assert printed.exit_code == 0 and "Model card: patterns v1" in printed.output
    assert "Sorting test patterns." in printed.output and "horizontal" in printed.output
    missing = runner.invoke(app, ["card", "patterns:9"])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_explain_writes_overlays_feature_maps_and_top_classes(trained: Path, cnn_home: Path, tmp_path: Path) -> None:
    images = sorted((cnn_home / "pattern-src" / "horizontal").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "explained"
    result = runner.invoke(app, ["explain", *map(str, images), str(broken), "--model", "patterns", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "explained with patterns v1" in result.output and "skipped" in result.output and "broken.png" in result.output
    )
    for image in images:
        for suffix in (".cam.png", ".features.png", ".json"):
            assert (out / f"{image.stem}{suffix}").is_file()
        summary = json.loads((out / f"{image.stem}.json").read_text())
        assert summary["top"][0]["class"] == summary["label"]
    nothing = runner.invoke(app, ["explain", str(broken), "--model", "patterns", "--out", str(out)])
    assert nothing.exit_code == 2 and "no image could be read" in nothing.output


def test_resume_and_errors(trained: Path, cnn_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nothing = runner.invoke(app, ["train", "--dataset", "patterns", "--resume", *EPOCHS])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
    bad = runner.invoke(app, ["train", "--dataset", "patterns", "--model", "vgg_ultra", "--epochs", "1"])
    assert bad.exit_code == 2 and "unknown model" in bad.output
    absent = runner.invoke(app, ["train", "--dataset", "ghost"])
    assert absent.exit_code == 2 and "cnn ingest" in absent.output
    monkeypatch.setenv("TORCH_HOME", str(cnn_home / "no-torch-cache"))
    uncached = runner.invoke(app, ["train", "--dataset", "patterns", "--model", "resnet18", "--weights", "imagenet"])
    said = " ".join(uncached.output.split())
    assert uncached.exit_code == 2 and "resnet18-f37072fd.pth is not in torch's cache" in said, uncached.output


# Last in the module: it registers a second version and moves the aliases.
def test_gate_holds_back_then_promote_and_rollback(trained: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(trained.read_text() + "min_improvement: 1.0\n")
    budgeted = ["--max-minutes", "0.2"]  # and a time budget: the epochs are planned from it
    result = runner.invoke(app, ["train", "--dataset", "patterns", "--config", str(strict), *EPOCHS, *budgeted])
    assert result.exit_code == 0, result.output
    assert "@challenger" in result.output
    assert "time budget: " in result.output and "of 0.2 min used" in result.output
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(MlflowClient().get_model_version("patterns", "2").run_id or "")
    assert run.data.metrics["budget_planned_epochs"] == run.data.metrics["epochs_run"] > 3  # more than --epochs
    assert run.data.metrics["budget_used_s"] <= 12.0 and "epochs planned" in run.data.tags["budget"]
    assert aliases("patterns") == {"champion": "1", "challenger": "2"}

    promoted = runner.invoke(app, ["promote", "patterns", "--version", "2"])
    assert promoted.exit_code == 0 and "v2 is now @champion" in promoted.output
    assert aliases("patterns") == {"champion": "2", "previous": "1"}

    back = runner.invoke(app, ["rollback", "patterns"])
    assert back.exit_code == 0, back.output
    assert aliases("patterns") == {"champion": "1", "previous": "2"}

    missing = runner.invoke(app, ["promote", "patterns", "--version", "9"])
    assert missing.exit_code == 2 and "no version 9" in missing.output


def test_local_model_copies_are_keyed_by_run_and_published_whole(trained: Path, cnn_home: Path) -> None:
    from mlflow.tracking import MlflowClient

    from flows import versions

    mv = MlflowClient().get_model_version("patterns", "1")
    run_id, digest = mv.run_id, mv.tags[versions.MANIFEST_TAG]
    folder = cnn_home / "models" / "patterns"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / f"1-{run_id}-{digest[:12]}", ignore_errors=True)
    (folder / f".1-{run_id}.dead.tmp").mkdir()  # what a download killed midway leaves
    (folder / "1-otherrun").mkdir()  # version 1 of a registry that was rebuilt since: not ours
    fetched = versions.fetch("patterns", "1", run_id, digest)
    assert fetched == folder / f"1-{run_id}-{digest[:12]}" and (fetched / "MLmodel").is_file()
    assert versions.fetch("patterns", "1", run_id, digest) == fetched  # downloaded once
    assert versions.load("patterns", "1").contract.classes == ["checker", "horizontal", "vertical"]


@pytest.mark.slowest
def test_the_registered_model_serves_from_a_fresh_virtualenv_built_from_its_requirements(
    trained: Path, cnn_home: Path, tmp_path: Path
) -> None:
    """`mlflow models serve` of the registered version, in a virtualenv that holds only what the model's
    requirements.txt (generated from the runtime set) installs, scores a JPEG 2000 DICOM: the codec plugins travel
    with the model."""
    import signal

    import mlflow
    from pydicom import dcmread
    from pydicom.uid import JPEG2000Lossless

    model = Path(mlflow.artifacts.download_artifacts("models:/patterns@champion", dst_path=str(tmp_path / "model")))
    wanted = (model / "requirements.txt").read_text()
    assert all(f"{plugin}==" in wanted for plugin in ("pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "python-gdcm"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, "-r", str(model / "requirements.txt")], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]

    scan = write_dicom(tmp_path / "scan.dcm", pattern_image("horizontal", np.random.default_rng(3)), "P-0001")
    ds = dcmread(scan)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(scan)
    assert dcmread(scan).file_meta.TransferSyntaxUID == JPEG2000Lossless

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    command = [str(venv / "bin" / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local"]
    env = clean_env(cnn_home, drop=("PREFECT_", "MLFLOW_", "PYTHONPATH"))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # as an activated virtualenv: its uvicorn
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # the pyfunc checks its files against the registry
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", timeout=300)
        answer = api_json(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": ["path"], "data": [[str(scan)]]}}
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(venv, ignore_errors=True)  # several GB (torch): not left for pytest's kept temporary folders
    row = answer["predictions"][0]
    assert row["error"] is None and row["label"] in ("checker", "horizontal", "vertical"), row

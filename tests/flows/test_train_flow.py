"""`cnn train` through Prefect into a real MLflow SQLite store: tracking, registry gate, promote, rollback,
and the registered pyfunc agreeing with the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.helpers import pattern_dataset

runner = CliRunner()
EPOCHS = ["--epochs", "3", "--batch-size", "16", "--lr", "0.003"]


@pytest.fixture
def trained(prefect_server: None, cnn_home: Path, tmp_path: Path) -> Path:
    from flows import workspace

    workspace.configure()
    pattern_dataset(cnn_home)
    config = tmp_path / "fast.yaml"
    config.write_text("model_options: {filters: [8, 16], dense: 32}\nloader_workers: 0\nwarmup_epochs: 0.5\n")
    result = runner.invoke(app, ["train", "--dataset", "patterns", "--config", str(config), *EPOCHS])
    assert result.exit_code == 0, result.output
    assert "@champion" in result.output and "no champion yet" in result.output
    return config


def _aliases(model: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(model).aliases.items()}


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
    artifacts = {a.path for folder in ("evaluation", "config", "dataset")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"evaluation/test_confusion_matrix.png", "evaluation/test_roc.png", "evaluation/test_reliability.png",
            "evaluation/training_curves.png", "evaluation/test_classification_report.txt",
            "config/config.yaml", "config/augmentation_policy.json", "dataset/report.md",
            "dataset/manifest_digest.json"} <= artifacts
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "patterns"
    assert str(cnn_home / "mlartifacts") in mlflow.get_experiment(run.info.experiment_id).artifact_location
    assert version.tags["gate.decision"] == "champion"


def test_gate_holds_back_then_promote_and_rollback(trained: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(trained.read_text() + "min_improvement: 1.0\n")
    result = runner.invoke(app, ["train", "--dataset", "patterns", "--config", str(strict), *EPOCHS])
    assert result.exit_code == 0, result.output
    assert "@challenger" in result.output
    assert _aliases("patterns") == {"champion": "1", "challenger": "2"}

    promoted = runner.invoke(app, ["promote", "patterns", "--version", "2"])
    assert promoted.exit_code == 0 and "v2 is now @champion" in promoted.output
    assert _aliases("patterns") == {"champion": "2", "previous": "1"}

    back = runner.invoke(app, ["rollback", "patterns"])
    assert back.exit_code == 0, back.output
    assert _aliases("patterns") == {"champion": "1", "previous": "2"}

    missing = runner.invoke(app, ["promote", "patterns", "--version", "9"])
    assert missing.exit_code == 2 and "no version 9" in missing.output


def test_pyfunc_from_registry_agrees_with_the_engine(trained: Path, cnn_home: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cnn.contract import ModelContract
    from cnn.data import load_split
    from cnn.dataset import Dataset
    from cnn.inference import Predictor

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
        [str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m", "models:/patterns@champion",
         "--env-manager", "local", "-i", str(csv), "-t", "csv"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    strict = json.JSONDecoder(parse_constant=lambda c: pytest.fail(f"{c} in the predictions is not JSON"))
    payload = strict.decode(out.stdout.strip().splitlines()[-1])
    assert [row["label"] for row in payload["predictions"]] == engine_labels[:5]
    assert all(row["error"] is None for row in payload["predictions"])


def test_resume_and_errors(trained: Path, cnn_home: Path) -> None:
    nothing = runner.invoke(app, ["train", "--dataset", "patterns", "--resume", *EPOCHS])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
    bad = runner.invoke(app, ["train", "--dataset", "patterns", "--model", "vgg_ultra", "--epochs", "1"])
    assert bad.exit_code == 2 and "unknown model" in bad.output
    absent = runner.invoke(app, ["train", "--dataset", "ghost"])
    assert absent.exit_code == 2 and "cnn ingest" in absent.output


def test_ddp_two_cpu_processes_match_single_process_steps(prefect_server: None, cnn_home: Path,
                                                          tmp_path: Path) -> None:
    """2 gloo processes: one version registered, same optimizer steps as one process with the same global batch."""
    from mlflow.tracking import MlflowClient

    from cnn.config import TrainConfig
    from cnn.train import fit
    from flows import workspace

    workspace.configure()
    root = pattern_dataset(cnn_home)
    options = {"model_options": {"filters": [8, 16], "dense": 32}, "loader_workers": 0, "epochs": 2, "batch_size": 16}
    single = fit(TrainConfig(**options), root, tmp_path / "single")
    config = tmp_path / "ddp.yaml"
    config.write_text("model_options: {filters: [8, 16], dense: 32}\nloader_workers: 0\nepochs: 2\nbatch_size: 16\n"
                      )
    result = runner.invoke(app, ["train", "--dataset", "patterns", "--config", str(config), "--nproc-per-node", "2"])
    assert result.exit_code == 0, result.output
    run_dir = next((cnn_home / "runs" / "patterns").iterdir())
    ddp = json.loads((run_dir / "fit.json").read_text())
    assert ddp["world_size"] == 2 and ddp["epochs_run"] == 2
    assert [h["steps"] for h in ddp["history"]] == [h["steps"] for h in single.history]
    assert [h["train_images_per_s"] > 0 for h in ddp["history"]] == [True, True]
    versions = MlflowClient().search_model_versions("name='patterns'")
    assert len(versions) == 1
    run = MlflowClient().get_run(versions[0].run_id)
    assert run.data.params["nproc_per_node"] == "2"
    assert len(MlflowClient().get_metric_history(run.info.run_id, "train_loss")) == 2  # rank 0 logs alone


def test_ddp_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    """Two gloo ranks train one epoch; a resumed job (same settings, more epochs) continues from epoch 1."""
    from cnn.config import TrainConfig

    root = pattern_dataset(tmp_path)
    run_dir = tmp_path / "run"

    def launch(epochs: int, resume: bool) -> dict:
        cfg = TrainConfig(model_options={"filters": [8, 16], "dense": 32}, loader_workers=0, epochs=epochs, batch_size=16)
        (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
        logs = tmp_path / f"logs-{epochs}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                   "--log-dir", str(logs), "--redirects", "3",
                   "-m", "flows.ddp_fit", "--dataset-dir", str(root), "--run-dir", str(run_dir),
                   "--config", str(tmp_path / "cfg.json")] + (["--resume"] if resume else [])
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        ranks = "".join(p.read_text(errors="replace") for p in sorted(logs.rglob("std*.log")))
        assert done.returncode == 0, ranks[-3000:] + done.stderr[-1500:]
        return json.loads((run_dir / "fit.json").read_text())

    first = launch(1, resume=False)
    assert first["epochs_run"] == 1 and first["world_size"] == 2
    resumed = launch(3, resume=True)
    assert resumed["epochs_run"] == 3 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][0] == first["history"][0]  # epoch 1 was not trained again

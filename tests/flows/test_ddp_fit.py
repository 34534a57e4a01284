"""DDP training through torchrun with 2 gloo processes on CPU: the flow registers once, steps match one process,
and a job resumes from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnn.config import TrainConfig
from cnn.model.run import FitResult
from cnn.model.train import fit
from flows.cli import app
from flows.train import launch_distributed
from tests.helpers import TINY, pattern_dataset, tiny_config

runner = CliRunner()
pytestmark = [pytest.mark.slow, pytest.mark.slowest]  # minutes: in make test-all and CI


def test_ddp_two_cpu_processes_match_single_process_steps(prefect_server: None, cnn_home: Path, tmp_path: Path) -> None:
    """2 gloo processes: one version registered, same optimizer steps as one process with the same global batch."""
    from mlflow.tracking import MlflowClient

    from flows import workspace

    workspace.configure()
    root = pattern_dataset(cnn_home)
    options = {**TINY, "epochs": 2, "batch_size": 16}
    single = fit(TrainConfig(**options), root, tmp_path / "single")
    config = tmp_path / "ddp.yaml"
    tiny_config(config, epochs=2, batch_size=16)
    result = runner.invoke(app, ["train", "--dataset", "patterns", "--config", str(config), "--nproc-per-node", "2"])
    assert result.exit_code == 0, result.output
    run_dir = next((cnn_home / "runs" / "patterns").iterdir())
    ddp = FitResult.load(run_dir)
    assert ddp.world_size == 2 and ddp.epochs_run == 2
    assert [h.steps for h in ddp.history] == [h.steps for h in single.history]
    assert all(h.train_images_per_s > 0 for h in ddp.history) and len(ddp.history) == 2
    versions = MlflowClient().search_model_versions("name='patterns'")
    assert len(versions) == 1
    run = MlflowClient().get_run(versions[0].run_id)
    assert run.data.params["nproc_per_node"] == "2"
    assert len(MlflowClient().get_metric_history(run.info.run_id, "train_loss")) == 2  # rank 0 logs alone


def test_ddp_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    """Two gloo ranks train one epoch; a resumed job (same settings, more epochs) continues from epoch 1."""

    root = pattern_dataset(tmp_path)
    run_dir = tmp_path / "run"

    def launch(epochs: int, resume: bool) -> FitResult:
        """torchrun without Prefect or MLflow: what a worker node of a multi-node job runs."""
        cfg = TrainConfig(**{**TINY, "epochs": epochs, "batch_size": 16, "nproc_per_node": 2})
        launch_distributed(str(root), str(run_dir), cfg, "", resume)
        return FitResult.load(run_dir)

    first = launch(1, resume=False)
    assert first.epochs_run == 1 and first.world_size == 2
    resumed = launch(3, resume=True)
    assert resumed.epochs_run == 3 and [h.epoch for h in resumed.history] == [1, 2, 3]
    assert resumed.history[0] == first.history[0]  # epoch 1 was not trained again

"""Training engine: learns, resumes bit-for-bit, guards against NaN, validates its config; metrics are right."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn.config import TrainConfig
from cnn.errors import UserError
from cnn.evaluation import evaluate_run
from cnn.metrics import compute_metrics, expected_calibration_error
from cnn.train import NonFiniteLossError, fit
from tests.helpers import pattern_dataset

FAST = dict(model="small_cnn", model_options={"filters": [8, 16], "dense": 32}, batch_size=16, lr=3e-3,
            warmup_epochs=0.5, loader_workers=0)


@pytest.fixture(scope="module")
def patterns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pattern_dataset(tmp_path_factory.mktemp("patterns"))


def test_short_training_beats_chance_by_far(patterns: Path, tmp_path: Path) -> None:
    """Bound: three balanced classes (chance 0.33); 8 epochs must reach test accuracy >= 0.8."""
    result = fit(TrainConfig(epochs=8, **FAST), patterns, tmp_path / "run")
    assert result.stopped == "completed" and result.epochs_run == 8
    assert len(result.history) == 8 and result.history[-1]["val_accuracy"] > 0.6
    evaluation = evaluate_run(tmp_path / "run", patterns, "test")
    assert evaluation.metrics.accuracy >= 0.8, evaluation.metrics.report()
    names = {p.name for p in evaluation.files}
    assert {"test_confusion_matrix.png", "test_roc.png", "test_reliability.png", "test_metrics.json"} <= names


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(patterns: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=4, policy="xray", **FAST)
    fit(cfg, patterns, tmp_path / "straight")

    class Interrupted(Exception):
        pass

    def stop_after_two(record: dict[str, float]) -> None:
        if record["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(cfg, patterns, tmp_path / "resumed", on_epoch=stop_after_two)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 2
    result = fit(cfg, patterns, tmp_path / "resumed", resume=True)
    assert result.epochs_run == 4 and len(result.history) == 4
    straight, resumed = _state(tmp_path / "straight" / "last.pt"), _state(tmp_path / "resumed" / "last.pt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_refuses_changed_settings(patterns: Path, tmp_path: Path) -> None:
    fit(TrainConfig(epochs=1, **FAST), patterns, tmp_path / "run")
    with pytest.raises(UserError, match="different lr"):
        fit(TrainConfig(epochs=2, **{**FAST, "lr": 0.1}), patterns, tmp_path / "run", resume=True)


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(patterns: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(TrainConfig(epochs=1, **FAST), patterns, run)
    digest = hashlib.sha256((run / "last.pt").read_bytes()).hexdigest()
    best = hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    exploding = TrainConfig(epochs=2, **{**FAST, "lr": 1e12, "optimizer": "sgd", "grad_clip": None})
    with pytest.raises(NonFiniteLossError, match="last good checkpoint was kept"):
        fit(exploding, patterns, run)
    assert hashlib.sha256((run / "last.pt").read_bytes()).hexdigest() == digest
    assert hashlib.sha256((run / "best.pt").read_bytes()).hexdigest() == best


def test_early_stopping_and_time_budget(patterns: Path, tmp_path: Path) -> None:
    stalled = TrainConfig(epochs=30, patience=1, **{**FAST, "lr": 1e-9, "schedule": "constant", "warmup_epochs": 0})
    result = fit(stalled, patterns, tmp_path / "a")
    assert result.stopped == "early_stopping" and result.epochs_run < 30
    budget = fit(TrainConfig(epochs=50, max_minutes=0.0001, **FAST), patterns, tmp_path / "b")
    assert budget.stopped == "time_budget" and budget.epochs_run == 1


def test_sampler_onecycle_sgd_label_smoothing_and_freeze(patterns: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, imbalance="sampler", schedule="onecycle", optimizer="sgd", label_smoothing=0.1,
                      freeze_epochs=1, **FAST)
    result = fit(cfg, patterns, tmp_path / "run")
    assert result.epochs_run == 2 and np.isfinite(result.history[-1]["train_loss"])


def test_config_file_overrides_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("model: resnet18\nepochs: 3\nlr: 0.01\n")
    cfg = TrainConfig.load(path, epochs=5, lr=None)
    assert (cfg.model, cfg.epochs, cfg.lr) == ("resnet18", 5, 0.01)
    assert cfg.flat()["epochs"] == "5"
    path.write_text("model: resnet18\nepocs: 3\n")
    with pytest.raises(UserError, match="epocs: Extra inputs are not permitted"):
        TrainConfig.load(path)
    path.write_text("epochs: many\n")
    with pytest.raises(UserError, match="epochs"):
        TrainConfig.load(path)
    with pytest.raises(UserError, match="config file not found"):
        TrainConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="optimizer"):
        TrainConfig.load(None, optimizer="lbfgs")


def test_unknown_device_and_missing_cuda(patterns: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown device"):
        fit(TrainConfig(epochs=1, device="tpu9", **FAST), patterns, tmp_path / "run")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            fit(TrainConfig(epochs=1, device="cuda", **FAST), patterns, tmp_path / "run")


def test_metrics_on_known_predictions() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 2])
    m = compute_metrics(probs, labels, ["a", "b", "c"])
    assert m.accuracy == 0.75
    assert m.confusion == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert m.per_class["c"].recall == 0.5 and m.per_class["c"].specificity == 1.0
    assert m.per_class["a"].specificity == pytest.approx(2 / 3)
    assert m.balanced_accuracy == pytest.approx((1 + 1 + 0.5) / 3)
    assert m.per_class["a"].auroc == 1.0
    perfect = np.eye(3)[[0, 1, 2]]
    assert expected_calibration_error(perfect, np.array([0, 1, 2])) == 0.0
    assert expected_calibration_error(np.array([[0.9, 0.1]] * 10), np.array([1] * 10)) == pytest.approx(0.9)

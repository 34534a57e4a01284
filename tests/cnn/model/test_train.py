"""Training engine: learns, resumes bit-for-bit, guards against NaN, validates its config; metrics are right."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn.config import TrainConfig
from cnn.errors import UserError
from cnn.model.networks import create_model, head_prefix
from cnn.model.run import EpochRecord, FitResult
from cnn.model.runtime import seed_everything
from cnn.model.train import NonFiniteLossError, fit
from cnn.trust.evaluation import evaluate_run
from tests.cnn.conftest import FAST


def test_short_training_beats_chance_by_far(patterns: Path, trained: FitResult) -> None:
    """Bound: three balanced classes (chance 0.33); 6 epochs must reach test accuracy >= 0.8."""
    assert trained.stopped == "completed" and trained.epochs_run == 6
    assert len(trained.history) == 6 and trained.history[-1].val["accuracy"] > 0.6
    evaluation = evaluate_run(trained.run_dir, patterns, "test")
    assert evaluation.metrics.accuracy >= 0.8, evaluation.metrics.report()
    names = {p.name for p in evaluation.files}
    assert {"test_confusion_matrix.png", "test_roc.png", "test_reliability.png", "test_metrics.json"} <= names


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(patterns: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=4, policy="xray", ema=0.99, **FAST)
    fit(cfg, patterns, tmp_path / "straight")

    class Interrupted(Exception):
        pass

    def stop_after_two(record: EpochRecord) -> None:
        if record.epoch == 2:
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
    averages = [torch.load(tmp_path / run / "last.pt", weights_only=True)["average"] for run in ("straight", "resumed")]
    assert averages[0]["updates"] == averages[1]["updates"] > 0  # the weights' average resumes too
    for key, value in averages[0]["averaged"].items():
        assert torch.equal(value, averages[1]["averaged"][key]), key


def test_the_weight_average_warms_up_and_is_what_is_saved(patterns: Path, tmp_path: Path) -> None:
    from cnn.model.ema import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, decay=0.999)
    expected = None
    for step, value in enumerate([1.0, 3.0, 5.0]):
        model.weight.data.fill_(value)
        decay = min(0.999, (1 + step) / (10 + step))
        average.update(model)
        expected = value if expected is None else decay * expected + (1 - decay) * value  # the first update copies
        assert average.module.weight.item() == pytest.approx(expected)

    result = fit(TrainConfig(epochs=1, ema=0.999, **FAST), patterns, tmp_path / "run")  # epoch 1 is the best
    saved = torch.load(result.weights, weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    kept = {key.removeprefix("module."): v for key, v in last["average"]["averaged"].items() if key != "n_averaged"}
    assert result.best_epoch == 1 and saved.keys() == kept.keys()
    assert all(torch.equal(saved[key], kept[key]) for key in saved)  # best.pt holds the average, not the raw weights
    assert not all(torch.equal(saved[key], last["model"][key]) for key in saved)


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
    """freeze_epochs=1: the first epoch moves only the head; the second moves the backbone too."""
    cfg = TrainConfig(
        epochs=2,
        imbalance="sampler",
        schedule="onecycle",
        optimizer="sgd",
        label_smoothing=0.1,
        freeze_epochs=1,
        **FAST,
    )
    seed_everything(cfg.seed)  # fit seeds the same way before building the model: these are its initial weights
    initial = create_model(cfg.model, 3, 1, None, **cfg.model_options).state_dict()
    snapshots: list[dict[str, torch.Tensor]] = []
    result = fit(
        cfg, patterns, tmp_path / "run", on_epoch=lambda _: snapshots.append(_state(tmp_path / "run" / "last.pt"))
    )
    assert result.epochs_run == 2 and np.isfinite(result.history[-1].train_loss)
    head = head_prefix(cfg.model) + "."
    backbone = [
        k
        for k in initial
        if not k.startswith(head) and initial[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))
    ]
    assert backbone and all(torch.equal(snapshots[0][k], initial[k]) for k in backbone), "frozen backbone moved"
    assert any(not torch.equal(snapshots[0][k], initial[k]) for k in initial if k.startswith(head))
    assert any(not torch.equal(snapshots[1][k], snapshots[0][k]) for k in backbone), "unfrozen backbone did not train"


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


def test_unknown_device(patterns: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown device"):
        fit(TrainConfig(epochs=1, device="tpu9", **FAST), patterns, tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: asking for one is no mistake here")
def test_asking_for_cuda_without_a_gpu(patterns: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no CUDA GPU"):
        fit(TrainConfig(epochs=1, device="cuda", **FAST), patterns, tmp_path / "run")


def test_fit_json_round_trips_through_fit_result(trained: FitResult) -> None:
    trained.save()
    loaded = FitResult.load(trained.run_dir)
    assert loaded == trained and loaded.contract.max_file_bytes == 256 * 1024 * 1024


def test_cpu_bf16_training_learns_what_fp32_learns_on_the_same_seed(patterns: Path, tmp_path: Path) -> None:
    """bf16 autocast on the CPU (what `auto` picks where its steps run faster): same seed, same data, the accuracy
    of fp32; the run records what it trained in."""
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(epochs=6, **{**FAST, "precision": precision})
        fit(cfg, patterns, tmp_path / precision).save()
        results[precision] = evaluate_run(tmp_path / precision, patterns, "test").metrics.accuracy
    assert FitResult.load(tmp_path / "bf16").precision == "bf16"
    assert results["fp32"] >= 0.8 and abs(results["bf16"] - results["fp32"]) <= 0.1, results


def test_auto_training_precision_is_measured_and_kept_on_resume(patterns: Path, tmp_path: Path) -> None:
    from cnn.model.precision import cpu_bf16_available

    cfg = TrainConfig(epochs=2, **{**FAST, "precision": "auto"})
    first = fit(cfg, patterns, tmp_path / "run")
    if not cpu_bf16_available():
        assert first.precision == "fp32" and "no native bf16" in first.precision_reason
    else:
        assert "fp32's speed" in first.precision_reason  # measured on this host
    resumed = fit(TrainConfig(epochs=3, **{**FAST, "precision": "auto"}), patterns, tmp_path / "run", resume=True)
    assert resumed.precision == first.precision and "resumed checkpoint" in resumed.precision_reason

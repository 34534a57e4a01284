"""Temperature scaling: it recovers the temperature that made a model overconfident, lowers the ECE without moving
any label, is decided on held-out folds of the validation split while the test split only reports, and every
predictor built from the contract applies it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cnn.data.dataset import Dataset
from cnn.infer.predictor import Predictor
from cnn.metrics.calibration import calibrate, fit_temperature, rescale
from cnn.metrics.classification import expected_calibration_error
from cnn.model.contract import ModelContract
from cnn.model.run import FitResult
from cnn.trust.evaluation import CalibrationResult, calibrate_run, evaluate_run, score_split


def _overconfident(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a model whose true logits were multiplied by `temperature` (labels drawn from the truth)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 4))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in truth])
    sharp = np.exp(logits * temperature)
    return sharp / sharp.sum(axis=1, keepdims=True), labels


def test_it_recovers_the_temperature_and_lowers_the_ece_without_moving_labels() -> None:
    val_probs, val_labels = _overconfident(4000, 2.5, seed=0)
    test_probs, test_labels = _overconfident(4000, 2.5, seed=1)
    assert fit_temperature(val_probs, val_labels) == pytest.approx(2.5, rel=0.1)
    result = calibrate(val_probs, val_labels, test_probs, test_labels)
    assert result.applied and result.test_ece_after < result.test_ece_before / 2
    assert result.val_nll_after < result.val_nll_before
    after = rescale(test_probs, result.temperature)
    assert np.array_equal(after.argmax(axis=1), test_probs.argmax(axis=1))
    assert np.allclose(after.sum(axis=1), 1.0)
    assert expected_calibration_error(after, test_labels) == pytest.approx(result.test_ece_after)


def test_the_test_split_decides_nothing_and_is_reported_whichever_way_it_went() -> None:
    val_probs, val_labels = _overconfident(2000, 2.5, seed=0)
    like_val = calibrate(val_probs, val_labels, *_overconfident(2000, 2.5, seed=1))
    unlike = calibrate(val_probs, val_labels, *_overconfident(2000, 0.4, seed=1))  # underconfident: softening hurts
    alone = calibrate(val_probs, val_labels)
    assert like_val.temperature == unlike.temperature == alone.temperature != 1.0
    assert like_val.applied and unlike.applied and alone.applied
    assert alone.cv_nll_after is not None and alone.cv_nll_before is not None
    assert alone.cv_nll_after < alone.cv_nll_before  # what decided: the held-out folds of validation
    assert unlike.test_ece_after is not None and unlike.test_ece_before is not None
    assert unlike.test_ece_after > unlike.test_ece_before and "On test the ECE rose" in unlike.note  # said, not hidden
    assert alone.test_ece_before is None and alone.test_ece_after is None


def test_temperature_one_is_kept_where_validation_cannot_tell() -> None:
    val_probs, val_labels = _overconfident(15, 2.5, seed=0)
    small = calibrate(val_probs, val_labels)
    assert not small.applied and small.temperature == 1.0 and "too few" in small.note
    calibrated_probs, calibrated_labels = _overconfident(3000, 1.0, seed=3)  # already calibrated
    kept = calibrate(calibrated_probs, calibrated_labels)
    assert kept.cv_nll_before is not None and kept.cv_nll_after is not None
    assert kept.applied == (kept.cv_nll_after < kept.cv_nll_before)  # the held-out folds' verdict, either way
    assert abs(kept.cv_nll_after - kept.cv_nll_before) < 0.01 and abs(kept.temperature - 1.0) < 0.1


def test_the_contract_carries_the_temperature_to_every_predictor(trained: FitResult, patterns, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    result = calibrate_run(run, patterns)
    contract = ModelContract.load(run / "contract.json")
    assert contract.temperature == result.calibration.temperature and contract.operating_points == []
    assert CalibrationResult.load(run) == result
    calibrated = Predictor.load(run / "best.pt", contract)
    raw = score_split(calibrated.uncalibrated(), Dataset(patterns), "test").probs
    assert np.allclose(
        score_split(calibrated, Dataset(patterns), "test").probs, rescale(raw, contract.temperature), atol=1e-5
    )
    labels = score_split(calibrated, Dataset(patterns), "test").labels
    if result.calibration.test_ece_after is not None:  # the test ECE reported is the one the applied T gives
        reported = expected_calibration_error(rescale(raw, contract.temperature), labels)
        assert reported == pytest.approx(result.calibration.test_ece_after)
    evaluation = evaluate_run(run, patterns)
    assert {f.name for f in evaluation.files} >= {
        "test_reliability.png",
        "test_explanations.png",
        "test_intervals.json",
    }
    assert set(evaluation.intervals) == set(contract.classes)
    for per_class in evaluation.intervals.values():
        recall = per_class["recall"]
        assert recall.low <= recall.value <= recall.high


def test_an_old_contract_without_calibration_loads_with_temperature_one(trained: FitResult, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    from dataclasses import asdict

    data = asdict(trained.contract)
    for key in ("temperature", "operating_points"):
        data.pop(key)
    (tmp_path / "contract.json").write_text(json.dumps(data))
    contract = ModelContract.load(tmp_path / "contract.json")
    assert contract.temperature == 1.0 and contract.points() == []
    assert replace(contract, temperature=2.0).temperature == 2.0

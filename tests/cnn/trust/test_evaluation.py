"""score_split: the one way a split is scored (training evaluation, the promotion gate, the benchmarks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cnn.data.dataset import Dataset
from cnn.errors import UserError
from cnn.infer.predictor import Predictor
from cnn.model.run import FitResult
from cnn.trust.evaluation import bf16_split_agreement, evaluate_run, score_split


def test_score_split_reads_the_cache_and_matches_decoding_the_files(trained: FitResult, patterns: Path) -> None:
    predictor = Predictor.load(trained.weights, trained.contract)
    dataset = Dataset(patterns)
    cached = score_split(predictor, dataset, "test")
    rows = dataset.usable("test", distinct=True)
    assert cached.image_ids == rows["image_id"].tolist() and len(cached.probs) == len(rows)
    assert [cached.classes[i] for i in cached.labels] == rows["label"].tolist()
    # The same model with another resize mode cannot use the cache: the files are decoded with its contract.
    other = replace(predictor, contract=replace(trained.contract, resize="crop"))
    decoded = score_split(other, dataset, "test")
    assert decoded.image_ids == cached.image_ids and np.array_equal(decoded.labels, cached.labels)
    files = predictor.predict_files(rows["path"].tolist())  # square sources: pad and crop decode alike
    np.testing.assert_allclose(decoded.probs, files[predictor.prob_columns].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(cached.probs, decoded.probs, atol=1e-5)


def test_score_split_refuses_labels_the_model_does_not_predict(trained: FitResult, patterns: Path) -> None:
    predictor = Predictor.load(trained.weights, replace(trained.contract, classes=["checker", "horizontal", "x"]))
    with pytest.raises(UserError, match="does not predict vertical"):
        score_split(predictor, Dataset(patterns), "test")


def test_evaluate_run_metrics_equal_score_split(trained: FitResult, patterns: Path) -> None:
    evaluation = evaluate_run(trained.run_dir, patterns, "test")
    direct = score_split(Predictor.load(trained.weights, trained.contract), Dataset(patterns), "test").metrics()
    assert evaluation.metrics.accuracy == direct.accuracy and evaluation.metrics.confusion == direct.confusion


def test_bf16_agreement_on_the_validation_split(trained: FitResult, patterns: Path) -> None:
    agreement = bf16_split_agreement(Predictor.load(trained.weights, trained.contract), Dataset(patterns), "val")
    assert agreement is not None and 0.8 <= agreement <= 1.0  # bf16 rounding flips few labels of a real model

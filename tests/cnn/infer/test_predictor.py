"""Predictor paths: torch.compile gives the eager model's predictions, and falls back to eager when it cannot."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn.infer.predictor import Predictor
from cnn.model.contract import ModelContract
from cnn.model.networks import create_model
from tests.helpers import unusable_compiler


@pytest.fixture()
def predictor(tmp_path: Path) -> Predictor:
    torch.manual_seed(0)
    contract = ModelContract("small_cnn", ["a", "b", "c"], 3, 32, "pad", [0.5] * 3, [0.25] * 3, {}, {}, "t")
    model = create_model("small_cnn", 3, 3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return Predictor.load(tmp_path / "w.pt", contract, "cpu", channels_last=True, fuse=True)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_compiled_predictor_matches_eager_on_full_and_partial_batches(predictor: Predictor) -> None:
    images = _images(40)  # batches of 16: two full, one of 8 padded to 16
    eager = predictor.predict_arrays(images, batch_size=16)
    compiled = predictor.compiled()
    out = compiled.predict_arrays(images, batch_size=16)
    assert not compiled.compile_failed
    assert out.shape == eager.shape == (40, 3)
    np.testing.assert_allclose(out, eager, atol=1e-4)
    np.testing.assert_allclose(compiled.predict_arrays(images[:5], batch_size=16), eager[:5], atol=1e-4)


def test_compile_failure_falls_back_to_eager(predictor: Predictor, caplog: pytest.LogCaptureFixture) -> None:
    images = _images(6)
    eager = predictor.predict_arrays(images)
    compiled = predictor.compiled()
    with unusable_compiler(), caplog.at_level(logging.WARNING, logger="cnn.infer.predictor"):
        out = compiled.predict_arrays(images)
    assert compiled.compile_failed
    assert "torch.compile failed" in caplog.text and "C++ compiler" in caplog.text
    np.testing.assert_allclose(out, eager, atol=1e-6)


def test_predict_files_one_row_per_input_with_errors(predictor: Predictor, tmp_path: Path) -> None:
    from tests.helpers import image_bytes

    good = image_bytes(_images(1)[0])
    (tmp_path / "a.png").write_bytes(good)
    (tmp_path / "text.png").write_text("not an image")
    frame = predictor.predict_files(
        [str(tmp_path / "a.png"), good, str(tmp_path / "missing.png"), str(tmp_path / "text.png")]
    )
    assert list(frame.columns) == ["label", "confidence", "decision", "prob_a", "prob_b", "prob_c", "error"]
    assert frame["error"].tolist() == [None, None, "file not found", "not an image: text file"]
    assert frame["label"].iloc[0] == frame["label"].iloc[1] in ("a", "b", "c")
    assert frame["label"].iloc[2] is None and np.isnan(frame["confidence"].iloc[2])
    np.testing.assert_allclose(
        frame.loc[0, predictor.prob_columns].to_numpy(dtype=float), predictor.predict_arrays(_images(1))[0], atol=1e-6
    )

"""A batch to score (patterns, an empty file, a text file, a copy) and the predictor scoring runs use."""

from __future__ import annotations

import shutil
from pathlib import Path

from cnn.infer.predictor import Predictor
from cnn.model.run import FitResult
from tests.helpers import write_patterns


def scoring_predictor(trained: FitResult) -> Predictor:
    return Predictor.load(trained.weights, trained.contract, "cpu", channels_last=True, fuse=True)


def incoming_batch(base: Path) -> Path:
    folder = write_patterns(base, per_class=3, seed=5)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("call the adjuster")
    shutil.copy(next(folder.glob("checker/*.png")), folder / "zz_copy.png")
    return folder

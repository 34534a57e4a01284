"""Plots are PNG files written atomically: the confusion matrix, ROC, reliability and training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnn.model.run import EpochRecord
from cnn.trust.plots import plot_confusion, plot_history, plot_reliability, plot_roc

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_plot_is_a_png_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], 60)
    history = [EpochRecord(e, 1.0 / e, 1e-3, 4, 1.0, 100.0, {"accuracy": 0.5 + e / 10}) for e in (1, 2, 3)]
    written = [
        plot_confusion([[5, 1, 0], [0, 6, 1], [1, 0, 7]], ["a", "b", "c"], tmp_path / "cm.png"),
        plot_roc(probs, labels, ["a", "b", "c"], tmp_path / "roc.png"),
        plot_reliability(probs, labels, tmp_path / "rel.png", before=probs),
        plot_history(history, tmp_path / "curves.png"),
    ]
    assert all(p.read_bytes().startswith(PNG) for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "curves.png", "rel.png", "roc.png"]

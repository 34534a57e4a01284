"""Evaluate a trained run on a split of its dataset: metrics, classification report and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn.contract import ModelContract
from cnn.data import CacheDataset, load_split, make_loader
from cnn.dataset import Dataset
from cnn.fsio import write_json_atomic, write_text_atomic
from cnn.metrics import ClassificationMetrics, compute_metrics
from cnn.plots import plot_confusion, plot_history, plot_reliability, plot_roc


@dataclass
class Evaluation:
    """Metrics of one split and the files written for it."""

    split: str
    metrics: ClassificationMetrics
    files: list[Path]


def evaluate_run(run_dir: str | Path, dataset_root: str | Path, split: str = "test", device: str = "cpu") -> Evaluation:
    """Score `split` from the cache with the run's best weights; write metrics, report and plots to run_dir/eval."""
    from cnn.inference import Predictor

    run_dir = Path(run_dir)
    contract = ModelContract.load(run_dir / "contract.json")
    predictor = Predictor.load(run_dir / "best.pt", contract, device)
    data = load_split(Dataset(dataset_root), split, contract.classes)
    loader = make_loader(CacheDataset(data), 128, train=False, workers=0)
    probs = np.concatenate([predictor.predict_arrays(images.numpy()) for images, _ in loader]) if len(data.slots) else \
        np.zeros((0, len(contract.classes)))
    metrics = compute_metrics(probs, data.labels, contract.classes)
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    files = [
        write_json_atomic(out / f"{split}_metrics.json", metrics.to_dict()),
        write_text_atomic(out / f"{split}_classification_report.txt", metrics.report()),
        plot_confusion(metrics.confusion, contract.classes, out / f"{split}_confusion_matrix.png"),
        plot_roc(probs, data.labels, contract.classes, out / f"{split}_roc.png"),
        plot_reliability(probs, data.labels, out / f"{split}_reliability.png"),
    ]
    fit_file = run_dir / "fit.json"
    if fit_file.is_file():
        history = json.loads(fit_file.read_text())["history"]
        files.append(plot_history(history, out / "training_curves.png"))
    return Evaluation(split, metrics, files)

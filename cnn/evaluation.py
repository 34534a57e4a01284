"""Score a split of a dataset with a predictor (the one way: training evaluation, the promotion gate and the
benchmarks all call `score_split`), and evaluate a trained run: metrics, classification report and plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnn.contract import ModelContract
from cnn.data import load_split
from cnn.dataset import Dataset
from cnn.errors import UserError
from cnn.fsio import write_json_atomic, write_text_atomic
from cnn.inference import Predictor
from cnn.metrics import ClassificationMetrics, compute_metrics
from cnn.parallel import decode_many
from cnn.plots import plot_confusion, plot_history, plot_reliability, plot_roc
from cnn.precision import top1_agreement


@dataclass(frozen=True)
class SplitScores:
    """A predictor's probabilities on one split of a dataset, one row per distinct image, with true labels."""

    split: str
    classes: list[str]
    probs: np.ndarray  # (N, C) in the predictor's class order
    labels: np.ndarray  # (N,) indices into `classes`
    image_ids: list[str]

    def metrics(self) -> ClassificationMetrics:
        return compute_metrics(self.probs, self.labels, self.classes)


def _cache_matches(dataset: Dataset, contract: ModelContract) -> bool:
    meta = dataset.meta()
    return meta.cache_key() == (contract.image_size, contract.channels, contract.resize)


def score_split(predictor: Predictor, dataset: Dataset, split: str, batch_size: int = 128) -> SplitScores:
    """Probabilities of `split` (distinct images): read from the ingest cache when it was decoded the way the model
    expects, else decoded from the source files with the model's own contract. The split's labels must be classes of
    the model (a UserError names the others)."""
    contract = predictor.contract
    rows = dataset.usable(split, distinct=True)
    unknown = sorted(set(rows["label"]) - set(contract.classes))
    if unknown:
        raise UserError(f"the model does not predict {', '.join(unknown)}, which {dataset.name}/{split} holds")
    if _cache_matches(dataset, contract):
        data = load_split(dataset, split, contract.classes)
        images = data.read_images() if len(data.slots) else np.zeros((0,))
        labels, image_ids = data.labels, data.image_ids
    else:
        outcomes = list(decode_many(rows["path"].tolist(), contract.decode_spec(), workers=1))
        kept = [i for i, o in enumerate(outcomes) if o.ok and o.array is not None]
        arrays = [a for a in (outcomes[i].array for i in kept) if a is not None]
        images = np.stack(arrays) if arrays else np.zeros((0,))
        labels = np.array([contract.classes.index(rows["label"].iloc[i]) for i in kept], dtype=np.int64)
        image_ids = [outcomes[i].image_id for i in kept]
    probs = predictor.predict_arrays(images, batch_size) if len(images) else np.zeros((0, len(contract.classes)))
    return SplitScores(split, list(contract.classes), probs, labels, list(image_ids))


def bf16_split_agreement(predictor: Predictor, dataset: Dataset, split: str = "val") -> float | None:
    """Top-1 agreement of bf16 autocast with fp32 on a split; None when the split is empty."""
    fp32 = score_split(predictor.with_precision(None), dataset, split)
    if not len(fp32.probs):
        return None
    return top1_agreement(fp32.probs, score_split(predictor.with_precision(torch.bfloat16), dataset, split).probs)


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one split and the files written for it."""

    split: str
    metrics: ClassificationMetrics
    files: list[Path]


def evaluate_run(run_dir: str | Path, dataset_root: str | Path, split: str = "test", device: str = "cpu") -> Evaluation:
    """Score `split` with the run's best weights; write metrics, report and plots to run_dir/eval."""
    from cnn.train import FitResult

    run_dir = Path(run_dir)
    predictor = Predictor.load(run_dir / "best.pt", ModelContract.load(run_dir / "contract.json"), device)
    scores = score_split(predictor, Dataset(dataset_root), split)
    metrics, classes = scores.metrics(), scores.classes
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    files = [
        write_json_atomic(out / f"{split}_metrics.json", metrics.to_dict()),
        write_text_atomic(out / f"{split}_classification_report.txt", metrics.report()),
        plot_confusion(metrics.confusion, classes, out / f"{split}_confusion_matrix.png"),
        plot_roc(scores.probs, scores.labels, classes, out / f"{split}_roc.png"),
        plot_reliability(scores.probs, scores.labels, out / f"{split}_reliability.png"),
    ]
    if (run_dir / "fit.json").is_file():
        files.append(plot_history(FitResult.load(run_dir).history, out / "training_curves.png"))
    return Evaluation(split, metrics, files)

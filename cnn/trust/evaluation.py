"""Score a split of a dataset with a predictor (the one way: training evaluation, the promotion gate and the
benchmarks all call `score_split`), and evaluate a trained run: metrics, classification report and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cnn.data.dataset import Dataset
from cnn.data.loaders import load_split
from cnn.errors import UserError
from cnn.fsio import write_json_atomic, write_text_atomic
from cnn.infer.predictor import Predictor, bf16_agreement
from cnn.io.pool import decode_many
from cnn.metrics.calibration import Calibration, calibrate, rescale
from cnn.metrics.classification import ClassificationMetrics, Interval, SplitScores, class_intervals
from cnn.metrics.operating_points import OperatingPoint, PointCheck, PointSpec, check, check_classes, choose
from cnn.model.contract import ModelContract
from cnn.model.run import FitResult, RunFolder
from cnn.trust.explain import contact_sheet, heatmaps, save_png
from cnn.trust.plots import plot_confusion, plot_history, plot_reliability, plot_roc


def _cache_matches(dataset: Dataset, contract: ModelContract) -> bool:
    meta = dataset.meta()
    return meta.cache_key() == (contract.image_size, contract.channels, contract.resize)


def split_images(dataset: Dataset, split: str, contract: ModelContract) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images NHWC uint8, labels, image ids) of `split`'s distinct images as the model sees them: read from the
    ingest cache when it was decoded the way the model expects, else decoded from the source files with the
    model's own contract. The split's labels must be classes of the model (a UserError names the others)."""
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
    return images, labels, list(image_ids)


def score_split(predictor: Predictor, dataset: Dataset, split: str, batch_size: int = 128) -> SplitScores:
    """Calibrated probabilities of `split`'s distinct images (see `split_images`)."""
    contract = predictor.contract
    images, labels, image_ids = split_images(dataset, split, contract)
    probs = predictor.predict_arrays(images, batch_size) if len(images) else np.zeros((0, len(contract.classes)))
    return SplitScores(split, list(contract.classes), probs, labels, image_ids)


def bf16_split_agreement(predictor: Predictor, dataset: Dataset, split: str = "val") -> float | None:
    """Top-1 agreement of bf16 autocast with fp32 on a split's images (decoded once); None when it is empty."""
    images, _, _ = split_images(dataset, split, predictor.contract)
    return bf16_agreement(predictor, images) if len(images) else None


@dataclass(frozen=True)
class CalibrationResult:
    """What `calibrate_run` fitted and chose on the validation split (also in the run's calibration.json)."""

    calibration: Calibration
    points: list[OperatingPoint]

    def to_dict(self) -> dict[str, object]:
        return {"calibration": self.calibration.to_dict(), "operating_points": [p.to_dict() for p in self.points]}

    def save(self, run_dir: Path) -> Path:
        return write_json_atomic(RunFolder(Path(run_dir)).calibration, self.to_dict())

    @classmethod
    def load(cls, run_dir: Path) -> CalibrationResult | None:
        path = RunFolder(Path(run_dir)).calibration
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        points = [OperatingPoint.from_dict(p) for p in data["operating_points"]]
        return cls(Calibration(**data["calibration"]), points)


def calibrate_run(run_dir: str | Path, dataset_root: str | Path, specs: Sequence[PointSpec] = ()) -> CalibrationResult:
    """Fit the temperature on the validation split (checked against the test split's ECE) and choose each
    operating point's threshold on the calibrated validation probabilities; both go into contract.json, so every
    predictor built from it applies them."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    contract = ModelContract.load(folder.contract)
    check_classes(specs, contract.classes)
    predictor = Predictor.load(folder.weights, replace(contract, temperature=1.0, operating_points=[]))
    dataset = Dataset(dataset_root)
    val = score_split(predictor, dataset, "val")
    has_test = len(dataset.usable("test")) > 0
    test = score_split(predictor, dataset, "test") if has_test else None
    if not len(val.labels):
        if specs:
            raise UserError(f"dataset {dataset.name} has no validation split to choose operating points on")
        calibration = Calibration(1.0, False, 0.0, 0.0, None, None, 0.0, 0.0, "no validation split: not calibrated")
    else:
        calibration = calibrate(val.probs, val.labels, *((test.probs, test.labels) if test else ()))
    val_probs = rescale(val.probs, calibration.temperature)
    points = [choose(spec, val_probs, val.labels, contract.classes) for spec in specs]
    contract.temperature = calibration.temperature
    contract.operating_points = [p.to_dict() for p in points]
    contract.save(folder.contract)
    result = CalibrationResult(calibration, points)
    result.save(run_dir)
    return result


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one split and the files written for it."""

    split: str
    metrics: ClassificationMetrics
    files: list[Path]
    checks: list[PointCheck] = field(default_factory=list)  # each operating point on this split
    intervals: dict[str, dict[str, Interval]] = field(default_factory=dict)  # class -> metric -> 95% interval


def evaluate_run(run_dir: str | Path, dataset_root: str | Path, split: str = "test", device: str = "cpu") -> Evaluation:
    """Score `split` with the run's best weights (calibrated); write metrics with bootstrap intervals, the
    operating points' checks, report and plots (reliability before and after calibration, heat maps of the
    most confident errors and least confident correct predictions) to run_dir/eval."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    predictor = Predictor.load(folder.weights, ModelContract.load(folder.contract), device)
    contract = predictor.contract
    images, labels, image_ids = split_images(Dataset(dataset_root), split, contract)
    probs = predictor.predict_arrays(images) if len(images) else np.zeros((0, len(contract.classes)))
    scores = SplitScores(split, list(contract.classes), probs, labels, image_ids)
    metrics, classes = scores.metrics(), scores.classes
    checks = [check(point, probs, labels, classes, split) for point in contract.points()]
    intervals = class_intervals(probs, labels, classes)
    out = folder.eval_dir
    out.mkdir(exist_ok=True)
    files = [
        write_json_atomic(out / f"{split}_metrics.json", metrics.to_dict()),
        write_json_atomic(
            out / f"{split}_intervals.json",
            {c: {m: asdict(i) for m, i in per.items()} for c, per in intervals.items()},
        ),
        write_text_atomic(out / f"{split}_classification_report.txt", metrics.report()),
        plot_confusion(metrics.confusion, classes, out / f"{split}_confusion_matrix.png"),
        plot_roc(probs, labels, classes, out / f"{split}_roc.png"),
        plot_reliability(
            probs, labels, out / f"{split}_reliability.png", before=rescale(probs, 1.0 / contract.temperature)
        ),
    ]
    if checks:
        files.append(write_json_atomic(out / f"{split}_operating_points.json", [c.to_dict() for c in checks]))
    if len(images):
        files.append(_explanation_sheet(predictor, images, probs, labels, out / f"{split}_explanations.png"))
    if folder.fit.is_file():
        files.append(plot_history(FitResult.load(run_dir).history, out / "training_curves.png"))
    return Evaluation(split, metrics, files, checks, intervals)


def record_checks(run_dir: str | Path, checks: Sequence[PointCheck]) -> None:
    """Keep each operating point's test figures in the run's contract.json, beside its threshold (before the model
    is logged and its digest recorded)."""
    if not checks:
        return
    path = RunFolder(Path(run_dir)).contract
    contract = ModelContract.load(path)
    contract.operating_points = [c.recorded().to_dict() for c in checks]
    contract.save(path)


def _explanation_sheet(
    predictor: Predictor, images: np.ndarray, probs: np.ndarray, labels: np.ndarray, path: Path, each: int = 8
) -> Path:
    """Heat maps of the most confident errors and the least confident correct predictions."""
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    picked = list(wrong[np.argsort(-confidence[wrong])][:each]) + list(right[np.argsort(confidence[right])][:each])
    classes = predictor.contract.classes
    maps = heatmaps(predictor, images[picked], predicted[picked])
    captions = [
        f"{'ERROR' if predicted[i] != labels[i] else 'correct'} {confidence[i]:.2f}\n"
        f"{classes[predicted[i]]} (true {classes[labels[i]]})"
        for i in picked
    ]
    title = f"Grad-CAM: {len(wrong[:each])} most confident errors, then {len(right[:each])} least confident correct"
    return save_png(contact_sheet(images[picked], maps, captions, title), path)

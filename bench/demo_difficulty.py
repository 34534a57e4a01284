"""How hard are the demo datasets? Majority class and a linear model on raw pixels against small_cnn.

    python bench/demo_difficulty.py [--kind xray|claims] [--n 600] [--size 64] [--epochs 30] [--seeds 3]

Generates the set, ingests it with the library, then reports test accuracy and balanced accuracy
(mean per-class recall) of each model on the same split. small_cnn is the registry's default, trained by
the engine as `cnn demo` trains it (best validation epoch, patience 10), once per seed. The demo data is
meant to defeat the first two and not the third.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from cnn.config import IngestOptions, TrainConfig
from cnn.data.dataset import Dataset
from cnn.data.demo import generate
from cnn.data.ingest import ingest
from cnn.data.loaders import load_split
from cnn.model.train import fit
from cnn.trust.evaluation import evaluate_run


def load_xy(dataset: Dataset, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = load_split(dataset, split, classes)
    return data.read_images(), data.labels


def engine_scores(root: Path, work: Path, epochs: int, seed: int) -> tuple[float, float]:
    """Test accuracy and balanced accuracy of the default small_cnn trained by the engine (best val epoch)."""
    cfg = TrainConfig(
        model="small_cnn",
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        policy="none",
        patience=10,
        loader_workers=0,
        seed=seed,
    )
    fit(cfg, root, work / f"run-{seed}")
    metrics = evaluate_run(work / f"run-{seed}", root).metrics
    return metrics.accuracy, metrics.balanced_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="xray")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="engine runs, one per seed (single runs vary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = generate(args.kind, Path(tmp) / "src", n=args.n)
        channels = 1 if args.kind == "xray" else 3
        root = Path(tmp) / "ds"
        ingest(made.source, root, IngestOptions(image_size=args.size, channels=channels))
        dataset = Dataset(root)
        classes = dataset.meta().classes
        x_train, y_train = load_xy(dataset, "train", classes)
        x_test, y_test = load_xy(dataset, "test", classes)
        results: dict[str, tuple[float, float]] = {}
        majority = np.full_like(y_test, np.bincount(y_train).argmax())
        results["majority class"] = _scores(y_test, majority)
        linear = LogisticRegression(max_iter=2000, class_weight="balanced", C=0.1)
        linear.fit(x_train.reshape(len(x_train), -1) / 255.0, y_train)
        results["logistic regression, raw pixels"] = _scores(
            y_test, linear.predict(x_test.reshape(len(x_test), -1) / 255.0)
        )
        runs = [engine_scores(root, Path(tmp), args.epochs, seed) for seed in range(args.seeds)]
        for seed, run in enumerate(runs):
            results[f"small_cnn (engine), seed {seed}"] = run
        accuracy, balanced = np.mean(runs, axis=0)
        results[f"small_cnn (engine), mean of {args.seeds}"] = (float(accuracy), float(balanced))
        print(f"{args.kind}: {len(y_train)} train / {len(y_test)} test images at {args.size}px, classes {classes}")
        for name, (accuracy, balanced) in results.items():
            print(f"{name:<34} accuracy {accuracy:.3f}   balanced accuracy {balanced:.3f}")


def _scores(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    return accuracy_score(truth, predicted), balanced_accuracy_score(truth, predicted)


if __name__ == "__main__":
    main()

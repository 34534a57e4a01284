"""Candidate training recipes against the defaults, on the demo sets, over seeds, inside a time budget.

    python bench/recipe.py [--kinds claims,xray] [--n 1200] [--size 64] [--minutes 1.0] [--seeds 3] [--recipes A,B]

Each recipe trains `cnn train`'s way (the engine's `fit`, `--max-minutes` planning the epochs and the schedule)
on the same ingested split, once per seed, and is scored on the test split with its best weights. Printed per
demo set and recipe: test accuracy and macro F1, mean and spread (sample standard deviation) over the seeds,
then each seed's accuracy; for recipes whose policy flips, also the test accuracy with a flip test-time
augmentation (the mean of the image's and its mirror's probabilities), which the pipeline does not apply.

Recipes (the keys of RECIPES; `--recipes` takes a comma-separated list): the defaults before the recipe; those
with the published small-image ingredients (label smoothing 0.1 and a moving average of the weights, as in the
CIFAR speed-run recipes); with the demo's learning rate and batch size (3e-3, 32) alone; the defaults now (all
of it); and the defaults with light augmentation (`policy: auto`). A default changes only where this bench
shows a gain larger than the spread over seeds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cnn.config import IngestOptions, TrainConfig
from cnn.data.dataset import Dataset
from cnn.data.demo import generate
from cnn.data.ingest import ingest
from cnn.infer.predictor import Predictor
from cnn.metrics.classification import compute_metrics
from cnn.model.contract import ModelContract
from cnn.model.train import fit
from cnn.trust.evaluation import evaluate_run, split_images

# The defaults before this recipe: AdamW at lr 1e-3, batch 64, no label smoothing, no weight average.
BEFORE: dict[str, Any] = {"lr": 1e-3, "batch_size": 64, "label_smoothing": 0.0, "ema": None}
RECIPES: dict[str, dict[str, Any]] = {
    "before": BEFORE,
    "before + label smoothing + average": {**BEFORE, "label_smoothing": 0.1, "ema": 0.999},
    "lr 3e-3 batch 32 alone": {**BEFORE, "lr": 3e-3, "batch_size": 32},
    "defaults": {},  # lr 3e-3, batch 32, label smoothing 0.1, weight average 0.999
    "defaults + policy auto": {"policy": "auto"},
}


def run(root: Path, work: Path, name: str, overrides: dict[str, Any], minutes: float, seed: int) -> dict[str, float]:
    """Train one recipe with one seed inside the budget; its test accuracy, macro F1 and flip-TTA accuracy."""
    cfg = TrainConfig(**{"max_minutes": minutes, "epochs": 200, "seed": seed, **overrides})
    run_dir = work / f"{name.replace(' ', '_').replace(',', '')}-{seed}"
    fit(cfg, root, run_dir)
    metrics = evaluate_run(run_dir, root).metrics
    result = {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "tta_accuracy": float("nan")}
    contract = ModelContract.load(run_dir / "contract.json")
    if contract.flips_preserve_label():
        predictor = Predictor.load(run_dir / "best.pt", contract, "cpu")
        images, labels, _ = split_images(Dataset(root), "test", contract)
        probs = (predictor.predict_arrays(images) + predictor.predict_mirrored(images)) / 2
        result["tta_accuracy"] = compute_metrics(probs, labels, contract.classes).accuracy
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="claims,xray")
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=1.0, help="--max-minutes of every run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    args = parser.parse_args()
    unknown = [name for name in args.recipes.split(",") if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    chosen = {name: RECIPES[name] for name in args.recipes.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in args.kinds.split(","):
            made = generate(kind, work / f"src-{kind}", n=args.n)
            root = work / f"ds-{kind}"
            ingest(made.source, root, IngestOptions(image_size=args.size, channels=1 if kind == "xray" else 3))
            counts = Dataset(root).usable().groupby("split").size().to_dict()
            print(f"\n{kind}: {counts} images at {args.size} px; {args.minutes} min per run; seeds 0..{args.seeds - 1}")
            for name, overrides in chosen.items():
                results = [run(root, work, f"{kind}-{name}", overrides, args.minutes, s) for s in range(args.seeds)]
                print(_row(name, results))


def _row(name: str, results: list[dict[str, float]]) -> str:
    def stat(key: str) -> str:
        values = np.array([r[key] for r in results])
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{values.mean():.3f} ± {spread:.3f}"

    seeds = " ".join(f"{r['accuracy']:.3f}" for r in results)
    tta = "" if np.isnan(results[0]["tta_accuracy"]) else f"   with flip TTA {stat('tta_accuracy')}"
    return f"  {name:<28} accuracy {stat('accuracy')}   macro F1 {stat('macro_f1')}   seeds [{seeds}]{tta}"


if __name__ == "__main__":
    main()

"""Candidate training recipes against the defaults, at real sizes and budgets, over seeds.

    python bench/recipe.py [--kinds garments] [--n N] [--size S] [--minutes 5,10] [--seeds 2] [--recipes A,B]

Each recipe trains `cnn train`'s way (the engine's `fit`, `--max-minutes` planning the epochs and the schedule)
on the same ingested split, once per seed and budget, and is scored on the test split with its best weights (chosen
on validation). Printed per data set, budget and recipe: test accuracy and macro F1, mean and spread (sample
standard deviation) over the seeds, then each seed's accuracy; for recipes whose policy flips, also the test
accuracy with a flip test-time augmentation (the mean of the image's and its mirror's probabilities).

Data: `garments` (cnn.data.garments: 30,000 generated 28 px grayscale scans in 10 classes, 21,000 of them for
training; the size of real small-image sets), and the demo sets `xray` and `claims` (600 images, 64 px).

Recipes (the keys of RECIPES; `--recipes` takes a comma-separated list): the defaults before issue 27 (small_cnn,
batch 32, lr 3e-3, no augmentation); the defaults now (cnn.model.recipe decides model, batch size, learning rate and
policy from the data: each run prints what it became); the rule's batch and policy with small_cnn; and the defaults
with flips (`policy: light`, with flip TTA). A default changes only where this bench shows a gain larger than the
spread over seeds.
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
from cnn.model.train import fit, resolved_config
from cnn.trust.evaluation import evaluate_run, split_images

BEFORE: dict[str, Any] = {"model": "small_cnn", "batch_size": 32, "lr": 3e-3, "policy": "none"}
RECIPES: dict[str, dict[str, Any]] = {
    "before": BEFORE,
    "defaults": {},
    "defaults-small_cnn": {"model": "small_cnn"},
    "defaults-flips": {"policy": "light"},
}
DATA = {  # kind: (images, side in px, channels)
    "garments": (30_000, 28, 1),
    "xray": (600, 64, 1),
    "claims": (600, 64, 3),
}


def run(root: Path, work: Path, name: str, overrides: dict[str, Any], minutes: float, seed: int) -> dict[str, Any]:
    """Train one recipe with one seed inside the budget; its test accuracy, macro F1, flip-TTA accuracy and what the
    recipe became."""
    cfg = TrainConfig(**{"max_minutes": minutes, "epochs": 500, "seed": seed, **overrides})
    run_dir = work / f"{name.replace(' ', '_').replace(',', '')}-{minutes}-{seed}"
    fitted = fit(cfg, root, run_dir)
    decided = resolved_config(cfg, Dataset(root))
    metrics = evaluate_run(run_dir, root).metrics
    result: dict[str, Any] = {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "tta_accuracy": float("nan")}
    result["became"] = f"{decided.model}, batch {decided.batch}, lr {decided.peak_lr:.2g}, policy {decided.policy}"
    result["epochs"] = fitted.budget.planned_epochs if fitted.budget else len(fitted.history)
    contract = ModelContract.load(run_dir / "contract.json")
    if contract.flips_preserve_label():
        predictor = Predictor.load(run_dir / "best.pt", contract, "cpu")
        images, labels, _ = split_images(Dataset(root), "test", contract)
        probs = (predictor.predict_arrays(images) + predictor.predict_mirrored(images)) / 2
        result["tta_accuracy"] = compute_metrics(probs, labels, contract.classes).accuracy
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="garments", help=f"comma-separated: {', '.join(DATA)}")
    parser.add_argument("--n", type=int, help="images to generate (default: by kind)")
    parser.add_argument("--size", type=int, help="side in px (default: by kind)")
    parser.add_argument("--minutes", default="5,10", help="comma-separated --max-minutes budgets")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--recipes", default="before,defaults", help=f"comma-separated, of: {', '.join(RECIPES)}")
    args = parser.parse_args()
    unknown = [name for name in args.recipes.split(",") if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    chosen = {name: RECIPES[name] for name in args.recipes.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in args.kinds.split(","):
            n, size, channels = DATA[kind]
            size = args.size or size
            made = generate(kind, work / f"src-{kind}", n=args.n or n)
            root = work / f"ds-{kind}"
            ingest(made.source, root, IngestOptions(image_size=size, channels=channels))
            counts = Dataset(root).usable().groupby("split").size().to_dict()
            for minutes in [float(m) for m in args.minutes.split(",")]:
                print(f"\n{kind}: {counts} images at {size} px; {minutes:g} min per run; seeds 0..{args.seeds - 1}")
                for name, overrides in chosen.items():
                    results = [run(root, work, f"{kind}-{name}", overrides, minutes, s) for s in range(args.seeds)]
                    print(_row(name, results), flush=True)


def _row(name: str, results: list[dict[str, float]]) -> str:
    def stat(key: str) -> str:
        values = np.array([r[key] for r in results])
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{values.mean():.3f} ± {spread:.3f}"

    seeds = " ".join(f"{r['accuracy']:.3f}" for r in results)
    tta = "" if np.isnan(results[0]["tta_accuracy"]) else f"   with flip TTA {stat('tta_accuracy')}"
    epochs = "/".join(str(r["epochs"]) for r in results)
    return (
        f"  {name:<24} accuracy {stat('accuracy')}   macro F1 {stat('macro_f1')}   seeds [{seeds}]{tta}\n"
        f"  {'':<24} ({results[0]['became']}; {epochs} epochs)"
    )


if __name__ == "__main__":
    main()

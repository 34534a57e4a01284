"""The GPU check, as ratios against a baseline measured in the same run: fp32 eager NCHW (the baseline) against
AMP + channels_last and against AMP + channels_last + torch.compile, for training and for the forward pass; then
JPEG files to Parquet through the scoring engine. Finishes well within 10 minutes on one GPU.

    python bench/gpu.py [--n 3000] [--size 224] [--epochs 3] [--batch 128] [--model resnet18]

Every figure comes from the functions production runs: `fit` with the config a user would set, `Predictor`
with the precision policy's choice, and `plan_shards` / `score_shard` for scoring.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnn.batch.file_sink import FileSink
from cnn.batch.plan import plan_shards
from cnn.batch.run import ModelRef, ScoringOptions
from cnn.batch.shard import Scorer
from cnn.config import IngestOptions, TrainConfig
from cnn.data.demo import generate
from cnn.data.ingest import ingest
from cnn.infer.predictor import Predictor
from cnn.io.inputs import ScoringInputs
from cnn.model.precision import choose_inference_precision
from cnn.model.run import FitResult
from cnn.model.train import fit

VARIANTS = {  # name -> (amp, channels_last, compile)
    "fp32 eager NCHW (baseline)": (False, False, False),
    "AMP + channels_last": (True, True, False),
    "AMP + channels_last + compile": (True, True, True),
}


def train_rate(
    root: Path, work: Path, args: argparse.Namespace, amp: bool, channels_last: bool, compile: bool
) -> tuple[float, FitResult]:
    """Training images/s over the epochs after the first (warm-up, and compilation when on)."""
    cfg = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch,
        device="cuda",
        amp=amp,
        channels_last=channels_last,
        compile=compile,
        loader_workers=8,
        patience=0,
    )
    result = fit(cfg, root, work / f"run-{int(amp)}{int(channels_last)}{int(compile)}")
    rates = [h.train_images_per_s for h in result.history[1:]]
    return sum(rates) / len(rates), result


def forward_rate(predictor: Predictor, images: np.ndarray, batch: int) -> float:
    predictor.predict_arrays(images[:batch], batch)  # warm-up (and compilation)
    torch.cuda.synchronize()
    start = time.perf_counter()
    predictor.predict_arrays(images, batch)
    torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def score_rate(paths: list[str], predictor: Predictor, out: Path, batch: int) -> float:
    sink, ref = FileSink(out), ModelRef("bench", "1", "")
    start = time.perf_counter()
    plan = plan_shards(ScoringInputs(pd.DataFrame({"path": paths}), []), [sink], ref, 512, out.parent)
    for shard in range(plan.shards):
        Scorer(predictor, ref, ScoringOptions(batch_size=batch)).score_shard(plan, shard, [sink])
    sink.finish()
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    print(
        f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"bf16 {torch.cuda.is_bf16_supported()}; {args.model} at {args.size}px, batch {args.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = generate("claims", work / "src", n=args.n, size=320)
        start = time.perf_counter()
        ingest(made.source, work / "ds", IngestOptions(image_size=args.size, channels=3))
        print(f"ingest (CPU decode): {args.n / (time.perf_counter() - start):.0f} images/s\n")

        rows, result = [], None
        for name, (amp, channels_last, compile) in VARIANTS.items():
            rate, fitted = train_rate(work / "ds", work, args, amp, channels_last, compile)
            result = result or fitted
            rows.append((f"train {name}", rate))
        images = np.random.default_rng(0).integers(0, 256, (1024, args.size, args.size, 3), dtype=np.uint8)
        assert result is not None
        baseline = Predictor.load(result.weights, result.contract, "cuda").with_precision(None)
        amp = choose_inference_precision("auto", baseline.device, lambda: None)
        fused = Predictor.load(result.weights, result.contract, "cuda", channels_last=True, fuse=True)
        fused = fused.with_precision(amp.autocast_dtype)
        forwards = {
            "fp32 eager NCHW (baseline)": baseline,
            f"{amp.name} autocast + channels_last, BN folded": fused,
            f"{amp.name} autocast + channels_last, compiled": fused.compiled(),
        }
        for name, predictor in forwards.items():
            rows.append((f"forward {name}", forward_rate(predictor, images, args.batch * 2)))
        paths = sorted(str(p) for p in (work / "src").rglob("*.jpg"))
        rows.append(
            (
                f"score {len(paths)} JPEGs -> Parquet ({amp.name}, channels_last)",
                score_rate(paths, fused, work / "preds.parquet", args.batch * 2),
            )
        )
        width = max(len(name) for name, _ in rows)
        for name, rate in rows:
            group = name.split(" ")[0]
            base = next(r for n, r in rows if n.startswith(group) and "baseline" in n) if group != "score" else rate
            print(f"{name:<{width}}  {rate:9.0f} images/s  {rate / base:5.2f}x")


if __name__ == "__main__":
    main()

"""Per-file overhead at three image sizes: ingest and scoring against a plain sequential single-process loop that
reads, hashes and decodes the same files (and, for scoring, runs one batched forward pass over them).

    python bench/per_file.py [--kinds png28,jpeg224,jpeg3000] [--n 20000,2000,60] [--repeats 2]

Kinds: `png28` 28 px gray PNGs (MNIST-like), `jpeg224` 224x224 JPEGs decoded at 224, `jpeg3000` 3000x2000 camera
JPEGs decoded to 224 (where JPEG draft decoding pays). Target on 2 cores: ingest and scoring each >= 2x the loop
at every size. Every contender runs the code a user runs: `ingest` (scan, hash, decode, cache, split, manifest),
and for scoring `plan_shards` + `score_shard` (the flow's engine without Prefect) with a small_cnn.

Below each kind it prints where the time goes (the profile behind a target out of reach): ingest's stages in
microseconds per file (scan, decode, split, commit and report, as `ingest` runs them), and for scoring the share of
the loop's time its forward pass alone takes (at or above half, 2x needs a faster forward than the loop's, which
the same fp32 model on the same cores cannot have) and the engine's parts (plan, shards, publish).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from collections.abc import Callable

from bench.ingest import best_rate
from cnn.batch.file_sink import FileSink
from cnn.batch.plan import plan_shards, shard_files
from cnn.batch.run import ModelRef, ScoringOptions, ShardPlan, ShardResult, decode_ahead_helps
from cnn.batch.shard import Scorer
from cnn.config import IngestOptions
from cnn.data import ingest as stages
from cnn.data.demo import render_claim
from cnn.data.report import build_report, save_report
from cnn.infer.predictor import Predictor
from cnn.io.inputs import ScoringInputs
from cnn.io.pool import default_workers
from cnn.model.contract import ModelContract
from cnn.model.networks import create_model

KINDS = {  # name: (target size, channels)
    "png28": (28, 1),
    "jpeg224": (224, 3),
    "jpeg3000": (224, 3),
}


def make_files(kind: str, folder: Path, n: int) -> list[Path]:
    """n files of `kind` in two class folders."""
    paths = []
    for i in range(n):
        label = ("a", "b")[i % 2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([11, i])
        if kind == "png28":
            image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L")
            path = folder / label / f"{i:06d}.png"
            image.save(path)
        else:
            size = (224, 224) if kind == "jpeg224" else (3000, 2000)
            path = folder / label / f"{i:06d}.jpg"
            render_claim(("none", "dent")[i % 2], rng, size).save(path, quality=90)
        paths.append(path)
    return paths


def sequential_loop(paths: list[Path], size: int, channels: int) -> np.ndarray:
    """What a user writes by hand: read the bytes, hash them, decode, convert, resize, to an array."""
    arrays = []
    mode = "L" if channels == 1 else "RGB"
    for path in paths:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(image))
    return np.stack(arrays)


def loop_and_predict(paths: list[Path], size: int, channels: int, predictor: Predictor) -> None:
    images = sequential_loop(paths, size, channels)
    predictor.predict_arrays(images.reshape(len(images), size, size, channels), 256)


def engine_ingest(folder: Path, work: Path, size: int, channels: int, parts: dict[str, float] | None = None) -> None:
    """`ingest`, stage by stage (the same calls in the same order), each stage's seconds added to `parts`."""
    target, options = work / "ds", IngestOptions(image_size=size, channels=channels)
    shutil.rmtree(target, ignore_errors=True)
    timer = _Timer(parts)
    with stages.ingest_lock(target):
        timer("scan", lambda: stages.stage_scan(folder, target, options))
        timer("decode", lambda: stages.stage_decode(target, options))
        timer("split", lambda: stages.stage_split(target, options))
        timer("commit + report", lambda: _commit(target, options))


def _commit(target: Path, options: IngestOptions) -> None:
    stages.commit_dataset(target, options)
    save_report(build_report(target, stages.staged_stats(target)), target)


class _Timer:
    """Runs steps, adding each one's seconds to `parts` under its name (nothing kept without `parts`)."""

    def __init__(self, parts: dict[str, float] | None) -> None:
        self.parts = parts

    def __call__(self, name: str, step: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = step()
        if self.parts is not None:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start
        return result


def engine_score(paths: list[Path], predictor: Predictor, work: Path, parts: dict[str, float] | None = None) -> None:
    out = work / "scores.parquet"
    out.unlink(missing_ok=True)
    sink, ref = FileSink(out), ModelRef("bench", "1", "")
    plan_dir = work / "plan"
    shutil.rmtree(plan_dir, ignore_errors=True)
    plan_dir.mkdir()
    frame = pd.DataFrame({"path": [str(p) for p in paths]})
    timer = _Timer(parts)
    shard_files_here = shard_files(predictor.contract.image_size)
    plan = timer("plan", lambda: plan_shards(ScoringInputs(frame, []), [sink], ref, shard_files_here, plan_dir))
    assert isinstance(plan, ShardPlan)
    scorer = Scorer(predictor, ref, ScoringOptions(batch_size=256, decode_ahead=decode_ahead_helps("cpu")))
    for shard in range(plan.shards):
        result = timer("shards", lambda shard=shard: scorer.score_shard(plan, shard, [sink]))
        assert isinstance(result, ShardResult)
        if parts is not None:
            parts["  of which waiting for decoded images"] = parts.get("  of which waiting for decoded images", 0.0)
            parts["  of which waiting for decoded images"] += result.decode_wait_s
    timer("publish", sink.finish)
    scorer.close()


def predictor_for(work: Path, size: int, channels: int) -> Predictor:
    mean, std = ModelContract.normalisation(channels, pretrained=False)
    contract = ModelContract("small_cnn", ["a", "b"], channels, size, "pad", mean, std, {}, {}, "bench")
    torch.manual_seed(0)
    weights = work / "model.pt"
    torch.save(create_model("small_cnn", 2, channels).state_dict(), weights)
    return Predictor.load(weights, contract, "cpu", channels_last=True, fuse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--n", default="20000,2000,60", help="files per kind, in the order of --kinds")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    kinds, counts = args.kinds.split(","), [int(x) for x in args.n.split(",")]
    print(f"{default_workers()} cores, {torch.get_num_threads()} torch threads, best of {args.repeats}")
    for kind, n in zip(kinds, counts):
        measure(kind, n, args.repeats)


def measure(kind: str, n: int, repeats: int) -> None:
    """One kind: the loop, ingest, the loop with a forward pass and scoring, on the same files; then the profile."""
    size, channels = KINDS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_files(kind, work / "src", n)
        predictor = predictor_for(work, size, channels)
        loop = best_rate(lambda: sequential_loop(paths, size, channels), n, repeats)
        loop_scored = best_rate(lambda: loop_and_predict(paths, size, channels, predictor), n, repeats)
        ingested = best_rate(lambda: engine_ingest(work / "src", work, size, channels), n, repeats)
        scored = best_rate(lambda: engine_score(paths, predictor, work), n, repeats)
        print(
            f"{kind:9s} ({n} files -> {size} px): loop {loop:8.1f}/s; ingest {ingested:8.1f}/s "
            f"= {ingested / loop:4.2f}x; loop + forward {loop_scored:8.1f}/s; scoring {scored:8.1f}/s "
            f"= {scored / loop_scored:4.2f}x (targets >= 2x)"
        )
        ingest_parts: dict[str, float] = {}
        engine_ingest(work / "src", work, size, channels, ingest_parts)
        score_parts: dict[str, float] = {}
        engine_score(paths, predictor, work, score_parts)
    per_file = ", ".join(f"{name} {1e6 * s / n:.1f}" for name, s in ingest_parts.items())
    print(f"  ingest, us per file: {per_file} (the loop: {1e6 / loop:.1f})")
    forward = max(0.0, 1 / loop_scored - 1 / loop)  # seconds per image the loop's forward pass takes
    print(
        f"  scoring: the loop's forward pass alone is {forward * loop_scored:.0%} of its time "
        f"({1e6 * forward:.0f} us per image); the engine, us per image: "
        + ", ".join(f"{name.strip()} {1e6 * s / n:.1f}" for name, s in score_parts.items())
    )


if __name__ == "__main__":
    main()

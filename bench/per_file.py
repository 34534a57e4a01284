"""Per-file overhead at three image sizes: ingest and scoring against a plain sequential single-process loop that
reads, hashes and decodes the same files (and, for scoring, runs one batched forward pass over them).

    python bench/per_file.py [--kinds png28,jpeg224,jpeg3000] [--n 4000,2000,60] [--repeats 2]

Kinds: `png28` 28 px gray PNGs (MNIST-like), `jpeg224` 224x224 JPEGs decoded at 224, `jpeg3000` 3000x2000 camera
JPEGs decoded to 224 (where JPEG draft decoding pays). Target on 2 cores: ingest and scoring each >= 2x the loop
at every size. Every contender runs the code a user runs: `ingest` (scan, hash, decode, cache, split, manifest),
and for scoring `plan_shards` + `score_shard` (the flow's engine without Prefect) with a small_cnn.
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

from bench.ingest import best_rate
from cnn.batch.file_sink import FileSink
from cnn.batch.plan import plan_shards, shard_files
from cnn.batch.run import ModelRef, ScoringOptions, decode_ahead_helps
from cnn.batch.shard import Scorer
from cnn.config import IngestOptions
from cnn.data.demo import render_claim
from cnn.data.ingest import ingest
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


def engine_ingest(folder: Path, work: Path, size: int, channels: int) -> None:
    target = work / "ds"
    shutil.rmtree(target, ignore_errors=True)
    ingest(folder, target, IngestOptions(image_size=size, channels=channels))


def engine_score(paths: list[Path], predictor: Predictor, work: Path) -> None:
    out = work / "scores.parquet"
    out.unlink(missing_ok=True)
    sink, ref = FileSink(out), ModelRef("bench", "1", "")
    plan_dir = work / "plan"
    shutil.rmtree(plan_dir, ignore_errors=True)
    plan_dir.mkdir()
    frame = pd.DataFrame({"path": [str(p) for p in paths]})
    plan = plan_shards(ScoringInputs(frame, []), [sink], ref, shard_files(predictor.contract.image_size), plan_dir)
    scorer = Scorer(predictor, ref, ScoringOptions(batch_size=256, decode_ahead=decode_ahead_helps("cpu")))
    for shard in range(plan.shards):
        scorer.score_shard(plan, shard, [sink])
    sink.finish()


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
    parser.add_argument("--n", default="4000,2000,60", help="files per kind, in the order of --kinds")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    kinds, counts = args.kinds.split(","), [int(x) for x in args.n.split(",")]
    print(f"{default_workers()} cores, {torch.get_num_threads()} torch threads, best of {args.repeats}")
    for kind, n in zip(kinds, counts):
        measure(kind, n, args.repeats)


def measure(kind: str, n: int, repeats: int) -> None:
    """One kind: the loop, ingest, the loop with a forward pass and scoring, on the same files."""
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


if __name__ == "__main__":
    main()

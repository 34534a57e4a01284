"""Scoring from an object store against scoring the same files from local disk, in one run: a real S3-compatible
server (SeaweedFS's `weed`, as the tests start it) on loopback, the same JPEGs in a bucket and in a folder, each
run from listing to a written table (a local Parquet file; the bucket's as Delta tables in another bucket).

    python bench/object_store.py [--n 256] [--model resnet18] [--size 224] [--rounds 3]

Prints images/s per run (rounds interleaved: local, bucket, local, ...), the median of each and the ratio
bucket / local (target >= 0.8), with the planning share (listing and hashing) of each; then the same for ingest
(listing, reading, decoding to 64 px and committing a dataset; no target, for information). Loopback has no network
latency: against a remote store, reads wait on the network, which the ratio here does not show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.score import make_jpegs, make_model
from cnn.batch.file_sink import Sink
from cnn.batch.plan import list_inputs, plan_shards
from cnn.batch.run import ModelRef, ScoringOptions
from cnn.batch.shard import Scorer
from cnn.batch.sinks import open_sink
from cnn.config import IngestOptions
from cnn.data.ingest import ingest
from cnn.infer.predictor import Predictor
from cnn.io import storage
from tests.s3 import start_s3_server


def score_once(source: str, output: str, predictor: Predictor, work: Path, batch: int) -> tuple[float, float, int]:
    """(seconds in all, seconds planning, images predicted) for one run from listing to the published table."""
    ref = ModelRef("bench", "1", "")
    start = time.perf_counter()
    sinks: list[Sink] = open_sink(output, None, "unused")
    plan = plan_shards(list_inputs(source), sinks, ref, 64, work)
    planned = time.perf_counter() - start
    predicted, scorer = 0, Scorer(predictor, ref, ScoringOptions(batch_size=batch))
    for shard in range(plan.shards):
        predicted += scorer.score_shard(plan, shard, sinks).predicted
    for sink in sinks:
        sink.finish()
    return time.perf_counter() - start, planned, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-object-store-"))
    folder = work / "images"
    make_jpegs(folder, args.n)
    weights, contract = make_model(work, args.model, args.size)
    predictor = Predictor.load(weights, contract, "cpu", channels_last=True, fuse=True)
    server = start_s3_server(work)
    try:
        import os

        os.environ.update(server.env())
        images, results = server.bucket("images"), server.bucket("results")
        fs, root = storage.filesystem(images)
        fs.pipe({f"{root}/incoming/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())})
        classes = folder.parent / "classes"  # the same files as class folders, for ingest
        for i, p in enumerate(sorted(folder.iterdir())):
            (classes / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
            (classes / f"c{i % 4}" / p.name).write_bytes(p.read_bytes())
        fs.pipe({f"{root}/classes/{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(classes.rglob("*.jpg"))})
        print(f"{args.n} JPEGs 640x480 -> {args.model} at {args.size} px, batch {args.batch}, {args.rounds} rounds")
        rates: dict[str, list[float]] = {"local": [], "bucket": []}
        shares: dict[str, list[float]] = {"local": [], "bucket": []}
        for r in range(args.rounds):
            for kind in ("local", "bucket"):
                source = str(folder) if kind == "local" else f"{images}/incoming/"
                output = str(work / f"local-{r}.parquet") if kind == "local" else f"{results}/preds-{r}"
                seconds, planned, predicted = score_once(source, output, predictor, work, args.batch)
                assert predicted == args.n, f"{kind}: {predicted} of {args.n} predicted"
                rates[kind].append(predicted / seconds)
                shares[kind].append(planned / seconds)
                print(f"  round {r + 1} {kind:6s}: {predicted / seconds:7.1f} images/s (planning {planned:.2f} s)")
        local, bucket = statistics.median(rates["local"]), statistics.median(rates["bucket"])
        print(f"local disk : {local:7.1f} images/s (planning {statistics.median(shares['local']):.0%} of the run)")
        print(f"bucket     : {bucket:7.1f} images/s (planning {statistics.median(shares['bucket']):.0%} of the run)")
        print(f"bucket / local: {bucket / local:.2f} (target >= 0.8)")
        ingested = {"local": [], "bucket": []}
        for r in range(args.rounds):
            for kind in ("local", "bucket"):
                source = str(folder.parent / "classes") if kind == "local" else f"{images}/classes"
                start = time.perf_counter()
                ingest(source, work / f"datasets-{kind}-{r}" / "bench", IngestOptions(image_size=64, channels=3))
                ingested[kind].append(args.n / (time.perf_counter() - start))
        local, bucket = statistics.median(ingested["local"]), statistics.median(ingested["bucket"])
        print(f"ingest to 64 px: local {local:.1f} images/s, bucket {bucket:.1f} images/s", end=", ")
        print(f"bucket / local {bucket / local:.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

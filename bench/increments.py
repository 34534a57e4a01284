"""What "already done" costs on a nightly re-run: planning a folder whose files are all scored (a file whose stat
is unchanged is known without being read; one replaced in place is read and scored again) against scoring the
same files the first time, for photos (640x480 JPEG) and for small images (28 px PNG), into Parquet.

    python bench/increments.py [--n 2000]

Prints, per kind: first run (images/s), re-run with nothing new (files/s planned, and its time as a share of the
first run), and a re-run after replacing 1 % of the files in place (how many it scored again).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.score import CLASSES, make_jpegs, make_model
from cnn.batch.file_sink import FileSink
from cnn.batch.plan import list_inputs, plan_shards
from cnn.batch.run import ModelRef, ScoringOptions, summarise
from cnn.batch.shard import Scorer
from cnn.infer.predictor import Predictor


def make_pngs(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def _bytes_read() -> int:
    """What this process has read through read() calls so far (Linux /proc/self/io)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def run(folder: Path, predictor: Predictor, out: Path, work: Path, planned: list[int]) -> tuple[float, int]:
    """One scoring run as `cnn score` does it, minus Prefect: (seconds, files scored); appends the bytes planning
    read (the inputs, and the tables' "already done") to `planned`."""
    sink, ref = FileSink(out), ModelRef("bench", "1", "")
    start, before = time.perf_counter(), _bytes_read()
    plan = plan_shards(list_inputs(str(folder)), [sink], ref, 256, work)
    planned.append(_bytes_read() - before)
    scorer = Scorer(predictor, ref, ScoringOptions())
    results = [scorer.score_shard(plan, i, [sink]) for i in range(plan.shards)]
    sink.finish()
    seconds = time.perf_counter() - start
    return seconds, summarise(results, plan, ref, seconds, []).files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights, contract = make_model(work / "model", "small_cnn", 64)
        predictor = Predictor.load(weights, contract, "cpu", channels_last=True, fuse=True)
        for kind in ("jpeg 640x480", "png 28 px"):
            folder = work / kind.split()[0]
            if kind.startswith("jpeg"):
                make_jpegs(folder, args.n)
            else:
                make_pngs(folder, args.n)
            size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            out = work / f"{folder.name}.parquet"
            planned: list[int] = []
            first, _ = run(folder, predictor, out, work, planned)
            again, scored = run(folder, predictor, out, work, planned)
            files = sorted(folder.iterdir())
            for path in files[::100]:  # 1 % replaced in place: the same picture, other bytes (a trailing byte)
                path.write_bytes(path.read_bytes() + b"\0")
            changed, rescored = run(folder, predictor, out, work, planned)
            print(
                f"{kind}: {args.n} files, {size:.0f} MiB | first run {args.n / first:.0f} images/s | "
                f"re-run, nothing new: {args.n / again:.0f} files/s planned, {again / first:.3f} x the first run "
                f"({scored} scored), planning read {planned[1] / 2**20:.1f} MiB | 1 % replaced: {rescored} scored "
                f"again in {changed:.1f} s"
            )
    print(f"classes: {', '.join(CLASSES)}; model small_cnn at 64 px")


if __name__ == "__main__":
    main()

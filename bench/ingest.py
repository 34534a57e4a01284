"""Ingest throughput against a plain sequential PIL decode-and-resize loop over the same JPEG files.

    python bench/ingest.py [--n 1000] [--width 800] [--size 224] [--repeats 2]

Prints images/s for each contender and the ratio to the baseline, all measured in this one run.
Target (2 cores): the engine at least 1.6x the sequential loop.

Then a night that adds 1% new files to the ingested folder: the bytes the re-ingest writes into the cache (its new
shard, on disk) against the whole cache, and its time against the first ingest's (target: about 1% written).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

import numpy as np
from PIL import Image

from cnn.config import IngestOptions
from cnn.data.demo import render_claim
from cnn.data.ingest import ingest
from cnn.io.decode import DecodeSpec
from cnn.io.pool import decode_many, default_workers


def make_jpegs(folder: Path, n: int, width: int, first: int = 0) -> list[Path]:
    """n vehicle-like JPEGs at width x 3/4 width, in two class folders (numbered from `first`)."""
    paths = []
    for i in range(first, first + n):
        label = ("none", "dent")[i % 2]
        image = render_claim(label, np.random.default_rng([7, i]), (width, width * 3 // 4))
        (folder / label).mkdir(parents=True, exist_ok=True)
        path = folder / label / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def sequential_pil(paths: list[Path], size: int) -> None:
    """What a user writes by hand: open, convert, resize keeping the aspect ratio, pad, to array."""
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
            canvas = Image.new("RGB", (size, size))
            canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
            np.asarray(canvas)


def engine_decode(paths: list[Path], size: int) -> None:
    """The engine's decoder: parallel workers, hashing, safety limits, JPEG draft decoding."""
    for _ in decode_many(paths, DecodeSpec(channels=3, size=size)):
        pass


def engine_decode_forkserver(paths: list[Path], size: int) -> None:
    """The same, with the start method used when the host runs threads (under Prefect): a forkserver."""
    with patch.object(threading, "active_count", lambda: 2):
        engine_decode(paths, size)


def engine_ingest(folder: Path, size: int, work: Path) -> None:
    """The whole library ingest: scan, hash, decode, write the memmap cache, split, manifest."""
    target = work / "ds"
    shutil.rmtree(target, ignore_errors=True)
    ingest(folder, target, IngestOptions(image_size=size))


def best_rate(fn: Callable[[], None], n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def added_night(folder: Path, size: int, work: Path, n: int, width: int) -> None:
    """Ingest, add 1% new files, ingest again: what the second ingest wrote into the cache, and its time."""
    target = work / "ds"
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    ingest(folder, target, IngestOptions(image_size=size))
    first = time.perf_counter() - start
    before = {path.name for path in (target / "cache").iterdir()}
    make_jpegs(folder, max(1, n // 100), width, first=n)
    start = time.perf_counter()
    ingest(folder, target, IngestOptions(image_size=size))
    second = time.perf_counter() - start
    on_disk = {path.name: path.stat().st_blocks * 512 for path in (target / "cache").iterdir()}
    written = sum(size for name, size in on_disk.items() if name not in before)
    total = sum(on_disk.values())
    print(
        f"\nadding {max(1, n // 100)} files (1%): the re-ingest wrote {written / 2**20:.1f} MiB of a "
        f"{total / 2**20:.1f} MiB cache ({written / total:.1%}; target about 1%) in {second:.1f} s "
        f"({second / first:.2f} of the first ingest's {first:.1f} s; every file is listed and stat-ed again)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_jpegs(work / "src", args.n, args.width)
        print(
            f"{args.n} JPEGs {args.width}x{args.width * 3 // 4} -> {args.size}px, "
            f"{default_workers()} cores, best of {args.repeats}"
        )
        base = best_rate(lambda: sequential_pil(paths, args.size), args.n, args.repeats)
        rates = {
            "sequential PIL loop (baseline)": base,
            "engine decode (decode_many)": best_rate(lambda: engine_decode(paths, args.size), args.n, args.repeats),
            "engine decode, forkserver workers (as under Prefect)": best_rate(
                lambda: engine_decode_forkserver(paths, args.size), args.n, args.repeats
            ),
            "engine ingest (scan+decode+cache+split)": best_rate(
                lambda: engine_ingest(work / "src", args.size, work), args.n, args.repeats
            ),
        }
        width = max(map(len, rates))
        for name, rate in rates.items():
            print(f"{name:<{width}}  {rate:8.1f} images/s  {rate / base:5.2f}x")
        added_night(work / "src", args.size, work, args.n, args.width)


if __name__ == "__main__":
    main()

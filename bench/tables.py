"""What a night costs as the tables grow: a night of new images scored into an empty table and into one that already
holds a long history (rows and their embeddings), for the Delta tables (`--output FOLDER`) and the plain Parquet file
(`--output X.parquet`, which rewrites its current rows every night), side by side in one run.

    python bench/tables.py [--history 1000000] [--night 1000] [--dim 128] [--similar 200000]

A night is what `cnn score` does minus Prefect: list and hash the night's files, ask the table which are done, score
them in shards of 256 with embeddings, commit, publish. Prints, per table kind: the night's seconds (the median of
three nights, each of other images) and bytes written into empty tables and into the full table, and their ratios
(target for Delta: at most 1.5x the time and 2x the bytes).
Then the same for the similar-case history (`History.extend`: a night's rows and vectors appended as a segment), into
an empty history and one of `--similar` rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.increments import make_pngs
from bench.score import CLASSES, make_model
from cnn.batch.delta_sink import DeltaSink
from cnn.batch.file_sink import FileSink
from cnn.batch.plan import list_inputs, plan_shards
from cnn.batch.run import ModelRef, ScoringOptions
from cnn.batch.shard import Scorer
from cnn.batch.tables import split_embeddings
from cnn.infer.predictor import Predictor
from cnn.similarity.history import HISTORY_COLUMNS, History

REF = ModelRef("bench", "1", "")
CHUNK = 100_000
REPEATS = 3  # nights measured per case (each of other images); the median is printed


def _written() -> int:
    """What this process has written through write() calls so far (Linux /proc/self/io), delta-rs's writes included."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["wchar"])


def history_rows(first: int, n: int, dim: int) -> pd.DataFrame:
    """n earlier predictions (other paths than the night's), each with its embedding, as a scoring run makes them."""
    rng = np.random.default_rng(first)
    numbers = np.arange(first, first + n)
    when = datetime(2025, 12, 1, tzinfo=UTC) + pd.to_timedelta(numbers // 10_000, unit="D")
    probs = rng.dirichlet(np.ones(len(CLASSES)), n)
    frame = pd.DataFrame(
        {
            "image_id": [f"{i:064x}" for i in numbers],
            "path": [f"/archive/{i // 10_000:04d}/{i:08d}.png" for i in numbers],
            "label": np.array(CLASSES)[probs.argmax(1)],
            "confidence": probs.max(1),
            "decision": "auto",
            "top_k": "[]",
            "needs_review": probs.max(1) < 0.5,
            "review_reason": None,
            "urgency": 1 - probs.max(1),
            "explanation": None,
            **{f"prob_{c}": probs[:, i] for i, c in enumerate(CLASSES)},
            "source_version": [f"stat:{i}" for i in numbers],
            "model_name": REF.name,
            "model_version": REF.version,
            "run_id": "",
            "scored_at": pd.DatetimeIndex(when).astype("datetime64[us, UTC]"),
            "flow_run_id": "",
            "superseded_at": pd.Series(pd.NaT, index=range(n), dtype="datetime64[us, UTC]"),
        }
    )
    frame["embedding"] = list(rng.standard_normal((n, dim), np.float32).astype(np.float16))
    return frame


def fill(kind: str, target: Path, rows: int, dim: int) -> None:
    """A table of `kind` holding `rows` earlier predictions."""
    if kind == "delta":
        sink = DeltaSink(str(target))
        for shard, first in enumerate(range(0, rows, CHUNK)):
            sink.commit(shard, history_rows(first, min(CHUNK, rows - first), dim), pd.DataFrame(), "history")
        return
    frames = [history_rows(first, min(CHUNK, rows - first), dim) for first in range(0, rows, CHUNK)]
    predictions, embeddings = split_embeddings(pd.concat(frames, ignore_index=True))
    predictions.to_parquet(target, index=False)
    embeddings.to_parquet(target.with_name(f"{target.stem}.embeddings.parquet"), index=False)


def night(kind: str, target: Path, folder: Path, predictor: Predictor, work: Path) -> tuple[float, int]:
    """One night into the table: (seconds, bytes written)."""
    sink = DeltaSink(str(target)) if kind == "delta" else FileSink(target)
    start, before = time.perf_counter(), _written()
    plan = plan_shards(list_inputs(str(folder)), [sink], REF, 256, work)
    scorer = Scorer(predictor, REF, ScoringOptions(embeddings=True))
    for shard in range(plan.shards):
        scorer.score_shard(plan, shard, [sink])
    sink.finish()
    scorer.close()
    assert plan.files == len(list(folder.iterdir())), "the night's files were all new"
    return time.perf_counter() - start, _written() - before


def similar_rows(first: int, n: int, dim: int) -> tuple[pd.DataFrame, np.ndarray]:
    """n rows of the similar-case history (HISTORY_COLUMNS) and their embeddings."""
    rng = np.random.default_rng(first)
    ids = [f"{i:064x}" for i in range(first, first + n)]
    rows = pd.DataFrame(
        {"image_id": ids, "path_key": [i[:16] for i in ids], "label": "none", "ids": "{}", "phash": "",
         "phash_mirror": "", "layout": [rng.bytes(192) for _ in range(n)],
         "scored_at": pd.Timestamp("2026-11-30", tz="UTC")}
    )  # fmt: skip
    return rows[HISTORY_COLUMNS], rng.standard_normal((n, dim), np.float32)


def history_night(history: History, night: tuple[pd.DataFrame, np.ndarray]) -> tuple[float, int]:
    start, before = time.perf_counter(), _written()
    history.extend(*night)
    return time.perf_counter() - start, _written() - before


def _median(runs: list[tuple[float, int]]) -> tuple[float, int]:
    """The median night's (seconds, bytes written), by time."""
    return sorted(runs)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--night", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128, help="embedding width of the history rows")
    parser.add_argument("--similar", type=int, default=200_000, help="rows of the similar-case history")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights, contract = make_model(work / "model", "small_cnn", 64)
        predictor = Predictor.load(weights, contract, "cpu", channels_last=True, fuse=True)
        nights = [work / f"night-{i}" for i in range(REPEATS)]
        for seed, folder in enumerate(nights):
            make_pngs(folder, args.night, seed=seed + 1)
        night("delta", work / "warm", nights[0], predictor, work)  # warm-up: imports, decode pool, first batches
        print(f"a night of {args.night} new 28 px PNGs, small_cnn at 64 px with embeddings; history {args.history:,}")
        for kind, name in (("delta", "delta tables (--output FOLDER)"), ("file", "plain Parquet (--output X.parquet)")):
            suffix = "" if kind == "delta" else ".parquet"
            full = work / f"{kind}-full{suffix}"
            start = time.perf_counter()
            fill(kind, full, args.history, args.dim)
            filled = time.perf_counter() - start
            empty = [work / f"{kind}-empty-{i}{suffix}" for i in range(REPEATS)]
            emptied = [night(kind, table, f, predictor, work) for table, f in zip(empty, nights)]
            grown = [night(kind, full, f, predictor, work) for f in nights]
            (t0, w0), (t1, w1) = _median(emptied), _median(grown)
            print(
                f"{name}: empty {t0:.2f} s, {w0 / 2**20:.1f} MiB written | with history {t1:.2f} s, "
                f"{w1 / 2**20:.1f} MiB written | ratio {t1 / t0:.2f}x time, {w1 / max(w0, 1):.2f}x bytes "
                f"(history written in {filled:.0f} s)"
            )
        night_rows = similar_rows(10**9, args.night, args.dim)
        History(work / "similar-warm").extend(*similar_rows(10**10, 10, args.dim))  # warm-up: FAISS's import
        t0, w0 = history_night(History(work / "similar-empty"), night_rows)
        full = History(work / "similar-full")
        full.extend(*similar_rows(0, args.similar, args.dim))
        t1, w1 = history_night(full, night_rows)
        print(
            f"similar-case history ({args.similar:,} rows, {args.dim}-dim): empty {t0:.2f} s, {w0 / 2**20:.1f} MiB "
            f"written | full {t1:.2f} s, {w1 / 2**20:.1f} MiB | ratio {t1 / t0:.2f}x time, {w1 / max(w0, 1):.2f}x bytes"
        )


if __name__ == "__main__":
    main()

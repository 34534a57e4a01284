"""Prediction tables: Parquet or CSV files (atomic) and SQL tables (upsert), each with a rejects twin.

A shard is committed on its own: a file sink writes one part file per shard atomically and merges the
parts into the output at the end; a SQL sink writes each shard in one transaction. A run killed at any
moment and run again therefore ends with every input exactly once, as a prediction or as a reject.

History: a path has one *current* row per model name, across both tables (`superseded_at` empty). When
a path is scored again (its bytes changed, a transient reject was retried, `--rescore` with another
version) the new row becomes current and the earlier one is kept, with `superseded_at` set to the time
the new row was scored. Prediction rows are unique per (path, image_id, model, version): a path and its bytes,
so two paths with the same bytes never share a row; rejects per (path, model, version).

Embeddings (the model's description of each image, `--embeddings`) go to a side table keyed like the predictions:
`X.embeddings.parquet` (float16 lists; also beside a CSV output) or `<table>_embeddings` (float16 bytes), written
in the same commit as the shard's predictions.

Review queue: the predictions that need review also go to `X.review.parquet|csv` (rebuilt at each publish from
the current predictions, most urgent first) or `<table>_review` (upserted with each shard). A reviewer fills
`reviewed_label`; a run keeps what is there (and any column a reviewer added to a review file).
"""

from __future__ import annotations

import fcntl
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import pandas as pd

from cnn.batch.tables import (
    ANSWER_KEY,
    CURRENT_COLUMNS,
    DRIFT_KEY,
    KEY,
    REJECT_KEY,
    REVIEWER_COLUMNS,
    as_time,
    duplicates,
    latest_per_path,
    mark_superseded,
    read_csv_table,
    review_queue,
    row_keys,
    side_table,
    split_embeddings,
    with_paths,
    write_csv,
    write_parquet,
)
from cnn.errors import UserError
from cnn.frames import among
from cnn.fsio import atomic_path, atomic_set, finish_set


class Sink(Protocol):
    """Where predictions and rejects go."""

    def current(self, model_name: str, paths: Sequence[str] | None = None) -> pd.DataFrame:
        """The current row of each path this model name scored (CURRENT_COLUMNS; reject_kind "" = predicted), of
        `paths` only where given (what planning asks about). Every sink answers alike: planning's duplicates are
        among the paths a run lists, and a copy of an image scored under a path it does not list gets a row of its
        own (the reuse check marks it)."""

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame, run_key: str = "") -> None:
        """Make one shard's rows durable, exactly once (`run_key`: the plan's id, the same for a retried shard)."""

    def finish(self) -> list[str]:
        """Publish; return where the tables live."""

    def record_drift(self, rows: pd.DataFrame) -> None:
        """Keep a run's drift statistics (one row per statistic, unique per flow run and statistic)."""


class FileSink:
    """`X.parquet` or `X.csv` plus `X.rejects.parquet|csv`; shard parts wait in `X.parts/`."""

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise UserError(f"--output must end in .parquet or .csv, not {path.name}")
        self.path = path.expanduser().resolve()
        self.rejects_path, self.review_path, self.duplicates_path, self.embeddings_path, self.drift_path = (
            Path(side_table(str(self.path), kind))
            for kind in ("rejects", "review", "duplicates", "embeddings", "drift")
        )
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.journal = self.path.with_name(f".{self.path.name}.publish.json")  # a publish's renames, while made
        self.csv = suffix == ".csv"

    def _read(self, path: Path) -> pd.DataFrame:
        if not path.is_file() or path.stat().st_size == 0:
            return pd.DataFrame()
        if not self.csv:
            return pd.read_parquet(path)
        return read_csv_table(path)

    def _read_review(self) -> pd.DataFrame:
        return self._read(self.review_path)

    def _parts(self, kind: str) -> list[Path]:
        return sorted(self.parts.glob(f"*.{kind}.parquet")) if self.parts.is_dir() else []

    def _all(self, kind: str) -> pd.DataFrame:
        if kind == "emb":
            stored = pd.read_parquet(self.embeddings_path) if self.embeddings_path.is_file() else pd.DataFrame()
            frames = [stored]
        else:
            frames = [self._read(self.path if kind == "pred" else self.rejects_path)]
        frames += [pd.read_parquet(p) for p in self._parts(kind)]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def current(self, model_name: str, paths: Sequence[str] | None = None) -> pd.DataFrame:
        with self._lock():  # a consistent view: no merge removes parts while they are read
            finish_set(self.journal)  # a publish killed between its renames: its set completed first
            latest = latest_per_path(self._all("pred"), self._all("rej"))
        wanted = latest["model_name"] == model_name
        if paths is not None:
            wanted &= among(latest["path"], list(paths))
        return latest.loc[wanted, CURRENT_COLUMNS].reset_index(drop=True)

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame, run_key: str = "") -> None:
        name = f"shard-{shard:06d}-{uuid.uuid4().hex[:12]}"  # unique across runs writing the same output
        predictions, embeddings = split_embeddings(predictions)
        with self._lock():  # never between another run's merge and its removal of the parts it merged
            self.parts.mkdir(parents=True, exist_ok=True)
            # Rejects and embeddings first: a shard counts as done when its predictions part exists.
            parts = [(rejects, "rej"), (embeddings, "emb"), (predictions, "pred")]
            for frame, kind in [(f, k) for f, k in parts if k != "emb" or len(f)]:
                with atomic_path(self.parts / f"{name}.{kind}.parquet") as tmp:
                    write_parquet(frame, tmp)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock on `X.lock` beside the output: commits and merges of concurrent runs take turns."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def finish(self) -> list[str]:
        with self._lock():
            return self._merge()

    def record_drift(self, rows: pd.DataFrame) -> None:
        with self._lock():
            table = pd.concat([self._read(self.drift_path), rows], ignore_index=True)
            table = table.loc[~row_keys(table, DRIFT_KEY).duplicated(keep="last")]
            with atomic_path(self.drift_path) as tmp:
                write_csv(table, tmp) if self.csv else table.to_parquet(tmp, index=False)

    def review_rows(self) -> pd.DataFrame:
        with self._lock():
            return self._read_review()

    def record_reviews(self, answers: pd.DataFrame) -> int:
        """The answers go into the review file (atomically, under the output's lock), to every row of the answered
        bytes and version (ANSWER_KEY); a publish keeps them, like everything a reviewer writes there."""
        with self._lock():
            review = self._read_review()
            if review.empty or answers.empty:
                return 0
            keyed = answers.set_index(row_keys(answers, ANSWER_KEY))
            index = row_keys(review, ANSWER_KEY)
            matched = among(index, keyed.index)
            for column in REVIEWER_COLUMNS:
                values = index[matched].map(keyed[column].to_dict())
                if column not in review.columns:
                    review[column] = pd.Series(None, index=review.index, dtype=object)
                review[column] = review[column].astype(object)
                review.loc[matched, column] = values.to_numpy()
            review["reviewed_at"] = pd.to_datetime(review["reviewed_at"], utc=True, format="ISO8601")
            with atomic_path(self.review_path) as tmp:
                write_csv(review, tmp) if self.csv else review.to_parquet(tmp, index=False)
            return int(matched.sum())

    def _merged(self) -> dict[str, pd.DataFrame]:
        """The tables as the publish writes them: what is published plus every committed part, each key once."""
        tables: dict[str, pd.DataFrame] = {}
        for kind, key in (("pred", KEY), ("rej", REJECT_KEY), ("emb", KEY)):
            merged = self._all(kind)
            if kind == "emb":  # vectors an earlier version kept without their path take their prediction's
                merged = with_paths(merged, tables["pred"])
            if not merged.empty:  # the newest row of a key wins (a retried reject, bytes that came back)
                merged["scored_at"] = as_time(merged["scored_at"])
                merged = merged.sort_values("scored_at", kind="stable")
                merged = merged.loc[~row_keys(merged, key).duplicated(keep="last")].sort_index()
            tables[kind] = merged
        mark_superseded(tables["pred"], tables["rej"])
        tables["review"] = review_queue(tables["pred"], self._read_review())
        tables["dup"] = duplicates(tables["pred"])
        return tables

    def _merge(self) -> list[str]:
        finish_set(self.journal)  # a publish killed between its renames: complete that set first
        tables = self._merged()
        targets = [("pred", self.path), ("rej", self.rejects_path), ("review", self.review_path)]
        if len(tables["dup"]):
            targets.append(("dup", self.duplicates_path))
        if len(tables["emb"]):
            targets.append(("emb", self.embeddings_path))
        for _, target in targets:
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a killed run's unfinished merge
                stale.unlink(missing_ok=True)
        # the tables as one set: all written before any replaces its file, so a disk that fills midway leaves the
        # published set as it was (and the parts, merged again by the next run)
        with atomic_set([target for _, target in targets], self.journal) as temps:
            for (kind, _), tmp in zip(targets, temps):
                if kind == "emb":
                    write_parquet(tables[kind], tmp)
                elif self.csv:
                    write_csv(tables[kind], tmp)
                else:
                    tables[kind].to_parquet(tmp, index=False)
        for part in self._parts("pred") + self._parts("rej") + self._parts("emb"):
            part.unlink()
        if self.parts.is_dir():
            # A run killed mid-write leaves its temporary part behind: an incomplete write, never a commit.
            for stale in self.parts.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            try:
                self.parts.rmdir()
            except OSError:  # something else appeared meanwhile: keep it; the next run merges it
                pass
        written = [str(self.path), str(self.rejects_path), str(self.review_path)]
        written += [str(self.duplicates_path)] if len(tables["dup"]) else []
        return written + ([str(self.embeddings_path)] if len(tables["emb"]) else [])

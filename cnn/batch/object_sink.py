"""A prediction table in an object store (`--output s3://bucket/preds/night.parquet`): exactly once without rename.

An object store has no rename and no lock, but it replaces an object whole in one PUT, and a listing shows an
object once its PUT has returned. So, with X the output URL:

  X.parts/<run>/shard-NNNNNN-<id>.{rej,emb,pred}.parquet   one committed shard (predictions written last: a shard
                                                           counts as done once its predictions object exists)
  X, X.rejects.*, X.review.*, X.duplicates.*,              the published tables, as the file sink writes them
  X.embeddings.parquet, X.drift.*
  X.manifest.json                                          written last by each publish: every table of that
                                                           publish with its version (ETag), size and rows

Publish merges the published tables with every committed part (a killed run's parts count), writes each table
with one PUT, then the manifest, and only then deletes the parts it merged. Killed anywhere in between, the next
run merges the same parts again, and the merge keeps one row per key: nothing is lost and nothing is doubled.
A reader of one table sees whole runs only; a reader that joins several checks their versions in the manifest.

Concurrency: shards of runs running at the same time commit safely (their parts have unique names). Publishes
take turns through a lock object (`X.publish.lock`, created with a conditional PUT and renewed while held; one
whose holder was killed is taken over after storage.LOCK_LEASE_S), so no publish overwrites another's rows.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from urllib.parse import quote, unquote

import pandas as pd

from cnn.batch.file_sink import FileSink
from cnn.batch.tables import (
    DRIFT_KEY,
    SideTable,
    as_time,
    read_csv_table,
    row_keys,
    side_table,
    split_embeddings,
)
from cnn.choices import PARTITION_COLUMNS
from cnn.errors import UserError
from cnn.io import storage

MANIFEST_FORMAT = "cnn-prediction-table/1"


class ObjectSink(FileSink):
    """The file sink's tables, in an object store: parts under a run's prefix, a manifest object written last."""

    def __init__(self, url: str) -> None:
        suffix = "." + url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
        if suffix not in (".parquet", ".csv"):
            raise UserError(f"--output must end in .parquet or .csv, not {storage.redact(url)}")
        storage.filesystem(url)  # an unknown scheme or a missing extra is refused before any file is decoded
        self.csv = suffix == ".csv"
        self.path_url = url
        self.rejects_url, self.review_url, self.duplicates_url, self.embeddings_url, self.drift_url = (
            side_table(url, kind) for kind in ("rejects", "review", "duplicates", "embeddings", "drift")
        )
        self.parts_url = f"{url}.parts"
        self.manifest_url = f"{url}.manifest.json"
        self.lock_url = f"{url}.publish.lock"

    # --- reading ---------------------------------------------------------------------------

    def _read_url(self, url: str, parquet: bool | None = None) -> pd.DataFrame:
        """A table (empty where there is none), in the sink's format or, with `parquet`, as Parquet."""
        if parquet if parquet is not None else not self.csv:
            return _read_parquet(url)
        try:
            return read_csv_table(io.BytesIO(storage.read_object(url)))
        except FileNotFoundError:
            return pd.DataFrame()

    def _read_review(self) -> pd.DataFrame:
        return self._read_url(self.review_url)

    def _part_urls(self, kind: str) -> list[str]:
        return [u for u in storage.list_prefix(self.parts_url) if u.endswith(f".{kind}.parquet")]

    def _all(self, kind: str) -> pd.DataFrame:
        parts = self._part_urls(kind)  # before the table: a part merged meanwhile is then in the table read next
        table = {"pred": self.path_url, "rej": self.rejects_url, "emb": self.embeddings_url}[kind]
        frames = [self._read_url(table, parquet=True if kind == "emb" else None)]
        frames += [self._read_url(u, parquet=True) for u in parts]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @contextmanager
    def _lock(self) -> Iterator[None]:
        yield  # reads and commits need no lock (see the module's note on concurrency)

    def finish(self) -> list[str]:
        with storage.exclusive(self.lock_url):
            return self._merge()

    # --- writing ---------------------------------------------------------------------------

    def _write_url(self, url: str, frame: pd.DataFrame, parquet: bool | None = None) -> None:
        if parquet if parquet is not None else not self.csv:
            _write_parquet(url, frame)
            return
        buffer = io.BytesIO()
        frame.to_csv(buffer, index=False)
        storage.write_object(url, buffer.getvalue())

    def commit(self, shard: int, predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
        run = _run_of(predictions, rejects)
        name = storage.join(self.parts_url, run, f"shard-{shard:06d}-{uuid.uuid4().hex[:12]}")
        predictions, embeddings = split_embeddings(predictions)
        # Rejects and embeddings first: a shard counts as done when its predictions object exists.
        for frame, kind in ((rejects, "rej"), (embeddings, "emb"), (predictions, "pred")):
            if kind != "emb" or len(frame):
                self._write_url(f"{name}.{kind}.parquet", frame, parquet=True)

    def record_drift(self, rows: pd.DataFrame) -> None:
        with storage.exclusive(self.lock_url):
            table = pd.concat([self._read_url(self.drift_url), rows], ignore_index=True)
            table = table.loc[~row_keys(table, DRIFT_KEY).duplicated(keep="last")]
            self._write_url(self.drift_url, table)

    def _merge(self) -> list[str]:
        parts = [u for kind in ("pred", "rej", "emb") for u in self._part_urls(kind)]
        tables = self._merged()
        targets = [("pred", self.path_url), ("rej", self.rejects_url), ("review", self.review_url)]
        if len(tables["dup"]):
            targets.append(("dup", self.duplicates_url))
        written: dict[str, dict[str, object]] = {}
        if len(tables["emb"]):
            self._write_url(self.embeddings_url, tables["emb"], parquet=True)
            written["embeddings"] = self._entry(self.embeddings_url, tables["emb"])
        for kind, target in targets:
            self._write_url(target, tables[kind])
            written[_TABLE_NAMES[kind]] = self._entry(target, tables[kind])
        manifest = {
            "format": MANIFEST_FORMAT,
            "published_at": datetime.now(UTC).isoformat(),
            "tables": written,
            "merged_parts": [u[len(self.parts_url) + 1 :] for u in parts],
        }
        storage.write_object(self.manifest_url, json.dumps(manifest, indent=2).encode("utf-8"))
        storage.remove(parts)  # only now: a publish killed before this line merges them again, once
        return [self.manifest_url, *(str(entry["url"]) for entry in written.values())]

    def _entry(self, url: str, frame: pd.DataFrame) -> dict[str, object]:
        found = storage.info(url)
        return {"url": url, "version": found.version, "size": found.size, "rows": len(frame)}


_TABLE_NAMES = {"pred": "predictions", "rej": "rejects", "review": "review", "dup": "duplicates"}


def _run_of(predictions: pd.DataFrame, rejects: pd.DataFrame) -> str:
    """The flow run that scored a shard (its parts' prefix); "local" outside Prefect."""
    for frame in (predictions, rejects):
        if len(frame) and "flow_run_id" in frame.columns and str(frame["flow_run_id"].iloc[0]):
            return str(frame["flow_run_id"].iloc[0])
    return "local"


def read_manifest(url: str) -> dict[str, object]:
    """The manifest of a table in an object store (what its last publish wrote); UserError when there is none."""
    try:
        return dict(json.loads(storage.read_object(f"{url}.manifest.json")))
    except FileNotFoundError:
        raise UserError(f"{storage.redact(url)} has not been published yet (no {url}.manifest.json)") from None


# --- partitioned tables ------------------------------------------------------------------------------------------


class PartitionedSink(ObjectSink):
    """Predictions as a Hive-partitioned Parquet table (`--partition-by date,label`): a folder or a bucket prefix
    that DuckDB, pandas (pyarrow) and Spark read as one table, on disk or in an object store.

      T/date=2026-11-30/label=cat/shard-NNNNNN-<id>.parquet    the predictions of one committed shard, per partition
      T/_rejects/shard-...parquet, T/_embeddings/shard-...     that shard's rejects and vectors (not partitioned)
      T/_review.parquet, T/_duplicates.parquet                 rebuilt at each publish, as in a single-file table
      T/_manifest.json                                         written last: every data file of the table
      T/_parts/<run>/...                                       committed shards waiting for the publish

    Rows are never rewritten: a table that grows night by night by new files only. The current row of a path is
    its newest (`scored_at`); `superseded_at` is not kept here (it would rewrite old partitions), so a query takes
    the newest row per path where history matters. A data file is named after the shard it came from, so a publish
    killed midway and run again writes the same files again, never a second copy; names starting with `_` are what
    readers of the data leave out (Spark, pyarrow; a glob that names the partitions, `date=*/label=*/*.parquet`)."""

    def __init__(self, root: str, partition_by: list[str]) -> None:
        unknown = [c for c in partition_by if c not in PARTITION_COLUMNS]
        if unknown or not partition_by:
            raise UserError(
                f"cannot partition by {', '.join(unknown) or 'nothing'}: use some of {', '.join(PARTITION_COLUMNS)}"
            )
        if root.lower().endswith(".csv"):
            raise UserError("--partition-by writes Parquet: name a folder or prefix for --output, not a .csv file")
        if storage.is_url(root):
            storage.filesystem(root)  # an unknown scheme or a missing extra is refused before any file is decoded
        self.root = root.rstrip("/")
        self.partition_by = list(partition_by)
        self.csv = False
        self.parts_url = storage.join(self.root, "_parts")
        self.manifest_url = storage.join(self.root, "_manifest.json")
        self.review_url, self.duplicates_url, self.drift_url = (
            side_table(self.root, kind, "partitioned") for kind in ("review", "duplicates", "drift")
        )
        self.lock_url = storage.join(self.root, "_publish.lock")

    # --- reading ---------------------------------------------------------------------------

    def _manifest(self) -> dict[str, list[str]]:
        try:
            found = json.loads(storage.read_object(self.manifest_url))
        except FileNotFoundError:
            return {"files": [], "rejects": [], "embeddings": []}
        return {k: list(found.get(k, [])) for k in ("files", "rejects", "embeddings")}

    def _read_data(self, key: str) -> pd.DataFrame:
        """One data file, with the partition values its path holds put back as columns."""
        frame = _read_parquet(storage.join(self.root, key))
        for part in key.split("/")[:-1]:
            name, _, value = part.partition("=")
            if name != "date" and name in self.partition_by:
                frame[name] = unquote(value)
        return frame

    def _all(self, kind: str) -> pd.DataFrame:
        parts = [u for u in storage.list_prefix(self.parts_url) if u.endswith(f".{kind}.parquet")]
        listed = self._manifest()[{"pred": "files", "rej": "rejects", "emb": "embeddings"}[kind]]
        frames = [self._read_data(k) if kind == "pred" else _read_parquet(storage.join(self.root, k)) for k in listed]
        frames += [_read_parquet(u) for u in parts]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # --- writing (commits, drift and the publish lock are ObjectSink's) ------------------------

    def _merge(self) -> list[str]:
        parts = storage.list_prefix(self.parts_url)
        listed = self._manifest()
        for url in parts:
            stem, kind = url.rsplit("/", 1)[1].rsplit(".", 2)[:2]
            frame = _read_parquet(url)
            if kind == "pred":
                listed["files"] += [k for k in self._write_partitions(stem, frame) if k not in listed["files"]]
            elif len(frame):
                side: SideTable = "rejects" if kind == "rej" else "embeddings"
                folder = side_table(self.root, side, "partitioned")  # its keys are relative to the root
                key = f"{folder[len(self.root) + 1 :]}/{stem}.parquet"
                _write_parquet(storage.join(self.root, key), frame)
                listed[side] += [key] if key not in listed[side] else []
        tables = self._merged()
        _write_parquet(self.review_url, tables["review"])
        written = [self.review_url]
        if len(tables["dup"]):
            _write_parquet(self.duplicates_url, tables["dup"])
            written.append(self.duplicates_url)
        manifest = {
            "format": MANIFEST_FORMAT,
            "published_at": datetime.now(UTC).isoformat(),
            "partition_by": self.partition_by,
            **{k: sorted(v) for k, v in listed.items()},
        }
        storage.write_object(self.manifest_url, json.dumps(manifest, indent=2).encode("utf-8"))
        storage.remove(parts)  # only now: a publish killed before this line writes the same files again
        return [self.root, self.manifest_url, *written]

    def _merged(self) -> dict[str, pd.DataFrame]:
        tables = super()._merged()
        tables["pred"] = tables["pred"].drop(columns="superseded_at", errors="ignore")
        return tables

    def _write_partitions(self, stem: str, frame: pd.DataFrame) -> list[str]:
        """Write one shard's predictions as one file per partition; the keys written, relative to the root."""
        if frame.empty:
            return []
        values = frame.assign(date=as_time(frame["scored_at"]).dt.strftime("%Y-%m-%d"))
        keys = []
        for group, rows in values.groupby(self.partition_by, sort=True, dropna=False):
            group = group if isinstance(group, tuple) else (group,)
            folder = "/".join(f"{c}={quote(str(v), safe='')}" for c, v in zip(self.partition_by, group))
            key = f"{folder}/{stem}.parquet"
            data = rows.drop(columns=[c for c in self.partition_by if c != "date"] + ["date"])
            data = data.drop(columns="superseded_at", errors="ignore")
            _write_parquet(storage.join(self.root, key), data.reset_index(drop=True))
            keys.append(key)
        return keys


def _read_parquet(url: str) -> pd.DataFrame:
    try:
        data = storage.read_object(url)
    except FileNotFoundError:
        return pd.DataFrame()
    return pd.read_parquet(io.BytesIO(data)) if data else pd.DataFrame()


def _write_parquet(url: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_object(url, buffer.getvalue())

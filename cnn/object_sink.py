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

Concurrency: shards of runs running at the same time commit safely (their parts have unique names). Publishing
is not serialised (there is no lock to take): a publish re-merges when the table changed under it, which narrows
but does not close the window; schedule runs that write the same output apart, or give each its own output.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pandas as pd

from cnn import storage
from cnn.errors import UserError
from cnn.sinks import DRIFT_KEY, FileSink, _frame_key, read_csv_table, split_embeddings

MANIFEST_FORMAT = "cnn-prediction-table/1"


class ObjectSink(FileSink):
    """The file sink's tables, in an object store: parts under a run's prefix, a manifest object written last."""

    def __init__(self, url: str) -> None:
        suffix = "." + url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
        if suffix not in (".parquet", ".csv"):
            raise UserError(f"--output must end in .parquet or .csv, not {storage.redact(url)}")
        storage.filesystem(url)  # an unknown scheme or a missing extra is refused before any file is decoded
        self.url = url
        self.csv = suffix == ".csv"
        stem = url[: -len(suffix)]
        self.path_url = url
        self.rejects_url = f"{stem}.rejects{suffix}"
        self.review_url = f"{stem}.review{suffix}"
        self.duplicates_url = f"{stem}.duplicates{suffix}"
        self.embeddings_url = f"{stem}.embeddings.parquet"
        self.drift_url = f"{stem}.drift{suffix}"
        self.parts_url = f"{url}.parts"
        self.manifest_url = f"{url}.manifest.json"

    # --- reading ---------------------------------------------------------------------------

    def _read_url(self, url: str, parquet: bool | None = None) -> pd.DataFrame:
        try:
            data = storage.read_object(url)
        except FileNotFoundError:
            return pd.DataFrame()
        if not data:
            return pd.DataFrame()
        if parquet if parquet is not None else not self.csv:
            return pd.read_parquet(io.BytesIO(data))
        return read_csv_table(io.BytesIO(data))

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
        yield  # nothing to lock in an object store (see the module's note on concurrency)

    # --- writing ---------------------------------------------------------------------------

    def _write_url(self, url: str, frame: pd.DataFrame, parquet: bool | None = None) -> None:
        buffer = io.BytesIO()
        if parquet if parquet is not None else not self.csv:
            frame.to_parquet(buffer, index=False)
        else:
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
        table = pd.concat([self._read_url(self.drift_url), rows], ignore_index=True)
        table = table.loc[~_frame_key(table, DRIFT_KEY).duplicated(keep="last")]
        self._write_url(self.drift_url, table)

    def _merge(self) -> list[str]:
        parts = [u for kind in ("pred", "rej", "emb") for u in self._part_urls(kind)]
        before = self._version(self.path_url)
        tables = self._merged()
        if self._version(self.path_url) != before:  # another run published meanwhile: merge what it wrote
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

    def _version(self, url: str) -> str:
        try:
            return storage.info(url).version
        except FileNotFoundError:
            return ""

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

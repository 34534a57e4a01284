"""Batch scoring in the library: list the inputs, plan shards against what the sinks already hold, score one
shard (decode in parallel with the ingest decoder, predict in batches, commit to every sink), and combine the
shard results into a summary. Every input ends up exactly once, as a prediction or a reject.

An orchestrator runs `plan_shards` once, `score_shard` once per shard (anywhere: shards share no state), then
`Sink.finish` and `summarise`; it passes the typed results below, never frames or tensors.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cnn.batch.sinks import EMBEDDING, REVIEW_COLUMN, VERSION_COLUMN, Sink
from cnn.config import ScoreConfig
from cnn.errors import UserError
from cnn.fsio import atomic_path, sha256_file
from cnn.infer.predictions import prediction_columns
from cnn.infer.predictor import Predictor
from cnn.io import storage
from cnn.io.decode import DecodeError, DecodeSpec, RejectKind, open_regular_file
from cnn.io.pool import DecodeOutcome, decode_many, default_workers, sample_size
from cnn.io.pseudonyms import pseudonym, pseudonyms
from cnn.io.sources import MANIFEST_SUFFIXES, iter_files, load_manifest_table, object_stats, visible_objects
from cnn.metrics.drift import DriftSample
from cnn.similarity.history import HISTORY_COLUMNS, History
from cnn.similarity.index import search_in_one_thread
from cnn.similarity.reuse import Lookup

STAMP_COLUMNS = ["model_name", "model_version", "run_id", "scored_at", "flow_run_id", "superseded_at"]
OUTPUT_COLUMNS = [
    "image_id",
    "path",
    "label",
    "confidence",
    "decision",
    "top_k",
    "needs_review",
    "review_reason",
    "urgency",
    "explanation",
    *STAMP_COLUMNS,
]
REJECT_COLUMNS = ["image_id", "path", "reason", "reject_kind", "attempts"]
PLAN_COLUMNS = ["image_id", "duplicate_of", "shard", "attempt", "local_copy"]
SPOOL = "objects"  # the run folder's copies of the objects the plan read (cnn.storage.fetch_objects)
_ID_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class ScoringInputs:
    """The files to score, one row each, with the id columns carried to the output."""

    files: pd.DataFrame  # columns: path, *id_columns
    id_columns: list[str]


@dataclass(frozen=True)
class ModelRef:
    """The model version a scoring run pinned, used from start to end: where its files are, and how it runs."""

    name: str
    version: str
    run_id: str
    files: str = ""  # local folder with the version's weights and contract
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 | int8, as the precision and backend policies chose
    precision_reason: str = ""
    compile: bool = False
    backend: str = "torch"  # torch | onnxruntime | openvino (cnn.backends)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def _default(field_name: str) -> Any:
    """ScoreConfig's default: the one home of the scoring defaults."""
    return ScoreConfig.model_fields[field_name].default


@dataclass(frozen=True)
class ScoringOptions:
    """How each shard is scored (defaults: ScoreConfig's)."""

    batch_size: int = _default("batch_size")
    top_k: int = _default("top_k")
    review_below: float = _default("review_below")
    decode_workers: int = _default("decode_workers")  # 0 = all cores
    flow_run_id: str = ""
    decode_time_limit_s: float = _default("decode_time_limit_s")
    review_flips: bool = _default("review_flips")
    review_margin: float = _default("review_margin")
    explain: str = _default("explain")  # none | review | all
    embeddings: bool = _default("embeddings")
    history_dir: str = ""  # where shards leave what they scored for the history (run folder); "" = nowhere
    explain_dir: str = ""  # where the overlays go ("" = nowhere)
    explain_base: str = ""  # the `explanation` column is relative to this folder ("" = absolute paths)
    decode_ahead: bool = False  # decode shard k+1 while shard k is in inference (shards run in order, one process)

    @classmethod
    def from_config(
        cls, config: ScoreConfig, flow_run_id: str, explain_dir: str = "", explain_base: str = ""
    ) -> ScoringOptions:
        """The options of a run; shards fanned out to Dask decode in the worker process (a daemon: one process)."""
        shared = {f.name: getattr(config, f.name) for f in fields(cls) if f.name in ScoreConfig.model_fields}
        workers = 1 if config.fan_out else config.decode_workers
        return cls(
            **{**shared, "decode_workers": workers},
            decode_ahead=not config.fan_out and decode_ahead_helps(config.device),
            flow_run_id=flow_run_id,
            explain_dir=explain_dir,
            explain_base=explain_base,
        )


@dataclass(frozen=True)
class ShardPlan:
    """The files still to score, cut into shards (saved as Parquet; shards read their rows from it)."""

    path: str
    shards: int
    files: int
    skipped: int  # these bytes at this path already have a current row in every sink
    id_columns: tuple[str, ...] = ()
    retried: int = 0  # files whose earlier reject was transient, tried again

    def remove(self) -> None:
        """Delete the plan file once the run is published (it lists paths and image ids), and what is left of its
        copies of objects."""
        Path(self.path).unlink(missing_ok=True)
        shutil.rmtree(Path(self.path).parent / SPOOL, ignore_errors=True)

    def rows(self, shard: int) -> pd.DataFrame:
        """The files of one shard, with their image_id and duplicate mark."""
        files = pd.read_parquet(self.path)
        return files[files["shard"] == shard].drop(columns="shard").reset_index(drop=True)


@dataclass(frozen=True)
class ShardResult:
    """What one committed shard held."""

    files: int
    predicted: int
    rejected: int
    seconds: float
    needs_review: int
    labels: dict[str, int] = field(default_factory=dict)
    rejects_by_kind: dict[str, int] = field(default_factory=dict)
    compile_failed: bool = False
    drift: DriftSample | None = None
    copies: int = 0  # images that repeat a training image or one scored before
    decode_wait_s: float = 0.0  # of `seconds`, how long inference waited for decoded images


@dataclass(frozen=True)
class Scored:
    """One shard's rows, and what it adds to the run's drift check and to the version's history."""

    predictions: pd.DataFrame
    rejects: pd.DataFrame
    drift: DriftSample | None = None
    history: pd.DataFrame | None = None  # HISTORY_COLUMNS + embedding


@dataclass(frozen=True)
class ScoringSummary:
    """A whole run: counts, where the tables are, and how it ran."""

    model: str
    precision: str  # fp32 | bf16 | fp16, and whether it ran compiled
    precision_reason: str  # why the policy chose it (with the measured bf16 agreement where there is one)
    files: int
    predicted: int
    rejected: int
    skipped: int
    needs_review: int
    seconds: float
    labels: dict[str, int]
    rejects_by_kind: dict[str, int]
    tables: list[str]
    retried: int = 0
    copies: int = 0
    drift: str = ""  # the drift check's verdict
    drifted: bool = False

    @property
    def images_per_s(self) -> float:
        return round(self.files / self.seconds, 1) if self.seconds > 0 else 0.0

    def rows(self) -> list[dict[str, object]]:
        """item/count rows, for the terminal table and the Prefect artifact."""
        rows: list[dict[str, object]] = [{"item": f"label {k}", "count": v} for k, v in sorted(self.labels.items())]
        rows += [{"item": f"rejected: {k}", "count": v} for k, v in sorted(self.rejects_by_kind.items())]
        rows += [
            {"item": "needs review", "count": self.needs_review},
            {"item": "already scored (skipped)", "count": self.skipped},
            {"item": "transient rejects tried again", "count": self.retried},
            {"item": "copies of earlier images", "count": self.copies},
            {"item": "images/s", "count": self.images_per_s},
        ]
        return rows


def list_inputs(source: str) -> ScoringInputs:
    """A folder (recursive), a glob, or a CSV/Parquet manifest with `path` and any id columns; each may be an object
    store URL (`s3://bucket/incoming/`, `s3://bucket/incoming/**/*.jpg`, `s3://bucket/batch.csv`), and a manifest
    may name objects. Objects carry their version (`source_version`), which tells an unchanged object without
    reading it again."""
    source = storage.local_path(source)
    inputs = _list_objects(source) if storage.is_url(source) else _list_local(source)
    if inputs.files["path"].map(storage.is_url).any():
        inputs = _with_versions(inputs)
    return inputs


def _list_objects(source: str) -> ScoringInputs:
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return _list_manifest(source)
    if any(ch in source for ch in "*?["):
        urls = storage.glob(source)
    else:
        urls = sorted(found.url for _, found in visible_objects(source))
    if not urls:
        raise UserError(f"nothing to score: no objects in {storage.redact(source)}")
    return ScoringInputs(pd.DataFrame({"path": urls}), [])


def _with_versions(inputs: ScoringInputs) -> ScoringInputs:
    """Add each object's version (one streamed listing per bucket; "" for local files and missing objects)."""
    found = object_stats(p for p in inputs.files["path"] if storage.is_url(p))
    versions = [found[p].version if p in found else "" for p in inputs.files["path"]]
    return replace(inputs, files=inputs.files.assign(**{VERSION_COLUMN: versions}))


def _list_manifest(path: Path | str) -> ScoringInputs:
    """A CSV/Parquet manifest (a file or an object) with `path` and any id columns to carry to the output; its
    relative paths start from its own folder."""
    shown = storage.redact(str(path))
    table = load_manifest_table(path)
    if "path" not in table.columns:
        raise UserError(f"manifest {shown} has no `path` column; it has: {', '.join(map(str, table.columns))}")
    ids = [str(c) for c in table.columns if c != "path"]
    reserved = {*OUTPUT_COLUMNS, *REJECT_COLUMNS, *PLAN_COLUMNS, REVIEW_COLUMN, VERSION_COLUMN}
    for column in ids:
        if not _ID_COLUMN.match(column):
            raise UserError(f"manifest column {column!r} cannot be carried to the output: use letters, digits and _")
        if column in reserved or column.startswith("prob_"):
            raise UserError(
                f"manifest column {column!r} has the name of a column the output has already; "
                "rename it (the output's own columns: " + ", ".join(sorted(reserved)) + ", prob_*)"
            )
    files = table.copy()
    base = storage.parent(str(path)) if storage.is_url(path) else str(Path(path).parent)
    files["path"] = [_beside(base, p) for p in files["path"].astype(str)]
    files[ids] = files[ids].astype(str)
    return ScoringInputs(files.drop_duplicates("path", ignore_index=True)[["path", *ids]], ids)


def _beside(base: str, path: str) -> str:
    """A manifest's path: a URL or an absolute path as it is, a relative one under the manifest's folder."""
    path = storage.local_path(path)
    if storage.is_url(path) or Path(path).is_absolute():
        return path
    return storage.join(base, path) if storage.is_url(base) else str(Path(base) / path)


def _list_local(source: str) -> ScoringInputs:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return _list_manifest(path)
    if path.is_dir():
        files = pd.DataFrame({"path": sorted(str(p) for p in iter_files(path))})
    elif any(ch in source for ch in "*?["):
        files = pd.DataFrame({"path": sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())})
    else:
        raise UserError(f"nothing to score: {source} is not a folder, a glob or a CSV/Parquet manifest")
    return ScoringInputs(files.drop_duplicates("path", ignore_index=True), [])


def content_ids(paths: Sequence[str], threads: int = 4) -> list[str]:
    """The sha256 of each file's bytes (the `image_id`); "" for a file that cannot be read as a regular file. Objects
    (URLs) are read several at a time."""
    urls = [i for i, p in enumerate(paths) if storage.is_url(p)]
    if urls:
        found = dict(zip(urls, storage.sha256_objects([paths[i] for i in urls])))
        rest = [i for i in range(len(paths)) if i not in found]
        local = dict(zip(rest, content_ids([paths[i] for i in rest], threads))) if rest else {}
        return [found[i] if i in found else local[i] for i in range(len(paths))]

    def digest(path: str) -> str:
        try:
            with open_regular_file(path) as handle:  # never blocks on a FIFO, never streams a device
                return sha256_file(handle)
        except (DecodeError, OSError):
            return ""  # unreadable or not a regular file: the decoder reports why

    def digests(chunk: Sequence[str]) -> list[str]:
        return [digest(path) for path in chunk]

    if sample_size(paths) < 256 * 1024:  # small files: the Python around each read outweighs what threads win
        return digests(paths)
    with ThreadPoolExecutor(threads) as pool:  # hashlib and large reads release the GIL
        return list(pool.map(digest, paths))


@dataclass(frozen=True)
class Masking:
    """Output columns written as keyed pseudonyms (`--pseudonymize`): carried id columns and, when named, `path`.
    The key stays in the process that writes the rows; it is never a parameter, a log line or a file here."""

    columns: tuple[str, ...] = ()
    key: bytes = field(default=b"", repr=False)

    def path(self, path: str) -> str:
        """A path as the tables show it."""
        return pseudonym(path, self.key) if "path" in self.columns else path

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        masked = frame.copy()
        for column in self.columns:
            if column in masked.columns:
                masked[column] = pseudonyms(masked[column], self.key)
        return masked

    def check(self, id_columns: Sequence[str]) -> None:
        unknown = sorted(set(self.columns) - {"path", *id_columns})
        if unknown:
            raise UserError(
                f"cannot pseudonymize {', '.join(unknown)}: name `path` or columns the manifest carries "
                f"({', '.join(id_columns) or 'none'})"
            )
        if self.columns and not self.key:
            raise UserError("pseudonymizing needs a key")


def mark_duplicates(
    files: pd.DataFrame, predicted: dict[str, str] | None = None, masking: Masking = Masking()
) -> pd.DataFrame:
    """Add `image_id` (unless there) and `duplicate_of`: a file whose bytes an earlier file has (in path order,
    or an earlier run's prediction) is a duplicate of it. Done once before sharding, so parallel shards agree.
    Paths are compared and named as the tables show them (`masking`)."""
    ids = files["image_id"].tolist() if "image_id" in files.columns else content_ids(files["path"].tolist())
    owner = dict(predicted or {})
    duplicate_of: list[str | None] = []
    for path, image_id in zip(files["path"].map(masking.path), ids):
        if not image_id:
            duplicate_of.append(None)
        elif image_id in owner and owner[image_id] != path:
            duplicate_of.append(owner[image_id])
        else:
            owner.setdefault(image_id, path)
            duplicate_of.append(None)
    return files.assign(image_id=ids, duplicate_of=duplicate_of)


@dataclass(frozen=True)
class Increment:
    """What a run still has to do, from the sinks' current rows: a file is done when its path has a current
    row for the same bytes (a prediction, a final reject, or a transient one tried `max_attempts` times)."""

    done: set[tuple[str, str]]  # (path, image_id)
    attempts: dict[tuple[str, str], int]  # transient rejects: tries so far
    owners: dict[str, str]  # image_id -> path of its current prediction (for duplicates)

    @classmethod
    def of(cls, current: pd.DataFrame, max_attempts: int) -> Increment:
        """From one sink's current rows (path, image_id, reject_kind ("" = prediction), attempts)."""
        pairs = list(zip(current["path"].astype(str), current["image_id"].astype(str)))
        kinds = current["reject_kind"].astype(str).tolist()
        tries = pd.to_numeric(current["attempts"], errors="coerce").fillna(1).astype(int).tolist()
        retry = {
            pair: n for pair, kind, n in zip(pairs, kinds, tries) if kind and _transient(kind) and n < max_attempts
        }
        owners = {image_id: path for (path, image_id), kind in zip(pairs, kinds) if not kind and image_id}
        return cls({pair for pair in pairs if pair not in retry}, retry, owners)


def _transient(kind: str) -> bool:
    try:
        return RejectKind(kind).transient
    except ValueError:  # a kind this version does not know (written by a newer one): final
        return False


def plan_shards(
    inputs: ScoringInputs,
    sinks: Sequence[Sink],
    model: ModelRef,
    shard_size: int,
    run_dir: Path,
    *,
    rescore: bool = False,
    max_attempts: int = 3,
    masking: Masking = Masking(),
) -> ShardPlan:
    """Hash every input, drop those every sink already holds with the same bytes (rows of any version, or of this
    version only with `rescore`), resolve duplicates by content, and number the shards."""
    masking.check(inputs.id_columns)
    currents = [sink.current(model.name) for sink in sinks]
    shown = inputs.files["path"].map(masking.path)  # what the tables hold
    ids, copies = _image_ids(inputs.files, shown, currents, Path(run_dir) / SPOOL)
    files = inputs.files.assign(image_id=ids)
    if any(copies):
        files["local_copy"] = copies
    pairs = pd.Series(list(zip(shown, files["image_id"])), dtype=object)
    todo = pd.Series(False, index=files.index)
    attempts: dict[tuple[str, str], int] = {}
    owners: dict[str, str] = {}
    for current in currents:
        if rescore:
            current = current[current["model_version"].astype(str) == str(model.version)]
        increment = Increment.of(current, max_attempts)
        todo |= ~pairs.isin(increment.done)  # done only when every sink has it
        attempts.update(increment.attempts)
        owners.update(increment.owners)
    keep = todo.to_numpy()
    files = mark_duplicates(files[keep].reset_index(drop=True), owners, masking)
    files["attempt"] = [attempts.get(pair, 0) + 1 for pair in pairs[keep]]
    files["shard"] = files.index // shard_size
    plan = Path(run_dir) / "plan.parquet"
    with atomic_path(plan) as tmp:
        files.to_parquet(tmp, index=False)
    shards = int(files["shard"].max() + 1) if len(files) else 0
    return ShardPlan(
        str(plan),
        shards,
        len(files),
        len(inputs.files) - len(files),
        tuple(inputs.id_columns),
        retried=int((files["attempt"] > 1).sum()),
    )


def sweep_copies(scoring_dir: Path, older_than_s: float = 7 * 86400) -> int:
    """Remove the object copies that killed runs left in their run folders (`<run>/objects/`, nothing in it touched
    for `older_than_s`: a run still going writes copies or removes them as it goes); return how many folders."""
    swept, now = 0, time.time()
    for folder in Path(scoring_dir).glob(f"*/{SPOOL}"):
        try:
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
        except OSError:  # removed meanwhile
            continue
        if now - newest > older_than_s:
            shutil.rmtree(folder, ignore_errors=True)
            swept += 1
    return swept


def _image_ids(
    files: pd.DataFrame, shown: pd.Series, currents: Sequence[pd.DataFrame], spool: Path
) -> tuple[list[str], list[str]]:
    """Each input's content id, and the local copy of the objects read for it: for an object whose version a sink
    recorded with the same path, the id recorded then (the object is not read at all); for other objects, the
    hash of the bytes, which are kept in `spool` for the decoder (up to storage.SPOOL_BYTES); for files, the hash."""
    copies = [""] * len(files)
    if VERSION_COLUMN not in files.columns:
        return content_ids(files["path"].tolist()), copies
    known: dict[tuple[str, str], str] = {}
    for current in currents:
        rows = current[current[VERSION_COLUMN].astype(str) != ""]
        known.update(zip(zip(rows["path"].astype(str), rows[VERSION_COLUMN].astype(str)), rows["image_id"].astype(str)))
    ids = [known.get((p, str(v)), "") if v else "" for p, v in zip(shown, files[VERSION_COLUMN])]
    paths = files["path"].tolist()
    objects = [i for i, image_id in enumerate(ids) if not image_id and storage.is_url(paths[i])]
    for i, (image_id, copy) in zip(objects, storage.fetch_objects([paths[i] for i in objects], spool)):
        ids[i], copies[i] = image_id, copy
    local = [i for i, image_id in enumerate(ids) if not image_id and not storage.is_url(paths[i])]
    for i, image_id in zip(local, content_ids([paths[i] for i in local])):
        ids[i] = image_id
    return ids, copies


_BESIDE = ThreadPoolExecutor(1, "reuse-check", search_in_one_thread)  # beside the model's forward pass
_AHEAD = ThreadPoolExecutor(1, "decode-ahead")  # the next shard's decoding, beside this shard's inference
_ahead: dict[tuple[str, int], Future[list[DecodeOutcome]]] = {}  # (plan folder, shard) -> its decoding
_PARTS: dict[Path, pd.DataFrame] = {}  # history parts read in this process (a part never changes once written)


def _run_rows(folder: Path, shard: int) -> pd.DataFrame:
    """The history rows (no embeddings) that other shards of this run committed so far: shards that ran before
    this one in the same process or elsewhere (shards running at the same time do not see each other)."""
    parts = [p for p in sorted(folder.glob("shard-*.parquet")) if p.name != f"shard-{shard:06d}.parquet"]
    for gone in [p for p in _PARTS if p not in parts]:  # another run's, or merged into the history
        del _PARTS[gone]
    for part in parts:
        if part not in _PARTS:
            _PARTS[part] = pd.read_parquet(part, columns=HISTORY_COLUMNS[:-1])
    frames = [_PARTS[p] for p in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=HISTORY_COLUMNS[:-1])


def extend_history(parts_dir: Path, history: History) -> int:
    """Add what a run's shards left in `parts_dir` (ScoringOptions.history_dir) to the version's history, then remove
    those parts; the number of images added."""
    parts = sorted(parts_dir.glob("shard-*.parquet"))
    if not parts:
        return 0
    rows = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v in rows[EMBEDDING]])
    added = history.extend(rows, vectors)
    for part in parts:
        part.unlink()
    return added


def score_shard(
    plan: ShardPlan,
    shard: int,
    predictor: Predictor,
    model: ModelRef,
    sinks: Sequence[Sink],
    options: ScoringOptions,
    masking: Masking = Masking(),
    explainer: Predictor | None = None,
    lookup: Lookup | None = None,
) -> ShardResult:
    """Score one shard of the plan and commit it to every sink (one transaction or one atomic part file each).
    `explainer` (the unfused model) draws the heat maps that `options.explain` asks for; `lookup` (the version's
    training reference and history) adds the similar cases and the reuse check."""
    files = plan.rows(shard)
    start = time.perf_counter()
    if lookup is not None and options.history_dir:  # what earlier shards of this run scored
        lookup = lookup.with_run(_run_rows(Path(options.history_dir), shard))
    spec = predictor.contract.decode_spec()
    decoded = _decoded(plan, shard, files, spec, options)
    waited = time.perf_counter() - start
    if options.decode_ahead and shard + 1 < plan.shards:
        key = (plan.path, shard + 1)
        _ahead.clear()  # one shard ahead at most: an older one was never asked for (a retried or failed run)
        _ahead[key] = _AHEAD.submit(_decode_rows, plan.rows(shard + 1), spec, options)
    scored = score_files(files, list(plan.id_columns), predictor, model, options, masking, explainer, lookup, decoded)
    predictions, rejects = scored.predictions, scored.rejects
    for sink in sinks:
        sink.commit(shard, predictions, rejects)
    for copy in filter(None, _copies(files)):  # committed: the plan's copies of this shard's objects are done
        Path(copy).unlink(missing_ok=True)
    if scored.history is not None and options.history_dir:  # after the commit: only what was committed
        with atomic_path(Path(options.history_dir) / f"shard-{shard:06d}.parquet") as tmp:
            scored.history.to_parquet(tmp, index=False)
    return ShardResult(
        files=len(files),
        predicted=len(predictions),
        rejected=len(rejects),
        seconds=time.perf_counter() - start,
        needs_review=int(predictions["needs_review"].sum()),
        labels={str(k): int(v) for k, v in predictions["label"].value_counts().items()},
        rejects_by_kind={str(k): int(v) for k, v in rejects["reject_kind"].value_counts().items()},
        compile_failed=predictor.compile_failed,
        drift=scored.drift,
        copies=int(predictions["duplicate_kind"].notna().sum()) if "duplicate_kind" in predictions else 0,
        decode_wait_s=waited,
    )


def decode_ahead_helps(device: str) -> bool:
    """Decoding the next shard during inference pays where inference leaves CPU cores free: on a GPU, or with more
    cores than torch's threads. Where both use every core it does not (0.95-1.00x on 2 cores, bench/score.py)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return True
    return default_workers() > torch.get_num_threads()


def _decoded(
    plan: ShardPlan, shard: int, files: pd.DataFrame, spec: DecodeSpec, options: ScoringOptions
) -> list[DecodeOutcome]:
    """The shard's decoded files: taken from the decoding started while the previous shard was in inference where
    there is one for the same files, else decoded now."""
    ahead = _ahead.pop((plan.path, shard), None)
    if ahead is not None:
        outcomes = ahead.result()  # its exceptions (a stop request, say) are this shard's
        if [o.path for o in outcomes] == _to_decode(files)["path"].tolist():
            return outcomes
    return _decode_rows(files, spec, options)


def _to_decode(files: pd.DataFrame) -> pd.DataFrame:
    """The rows a shard decodes: all but those the plan marked as duplicates of an earlier row."""
    return files.loc[files["duplicate_of"].isna()] if "duplicate_of" in files.columns else files


def _decode_rows(files: pd.DataFrame, spec: DecodeSpec, options: ScoringOptions) -> list[DecodeOutcome]:
    """Decode the rows' files; an object the plan kept a local copy of is read from that copy (and named by its
    URL in the outcome)."""
    rows = _to_decode(files)
    paths = rows["path"].tolist()
    reads = [c or p for c, p in zip(_copies(rows), paths)]
    outcomes = decode_many(reads, spec, options.decode_workers, time_limit_s=options.decode_time_limit_s)
    return [o if o.path == p else replace(o, path=p) for o, p in zip(outcomes, paths)]


def _copies(files: pd.DataFrame) -> list[str]:
    if "local_copy" not in files.columns:
        return [""] * len(files)
    return [str(c) for c in files["local_copy"].fillna("")]


def score_files(
    files: pd.DataFrame,
    id_columns: list[str],
    predictor: Predictor,
    model: ModelRef,
    options: ScoringOptions,
    masking: Masking = Masking(),
    explainer: Predictor | None = None,
    lookup: Lookup | None = None,
    decoded: list[DecodeOutcome] | None = None,
) -> Scored:
    """One shard's rows: a prediction or a reject for each input file (rows that `mark_duplicates` marked
    `duplicate_of` become "duplicate" rejects without being decoded), its drift sample and its history rows.
    `decoded` holds the outcomes of the rows to decode where they were decoded already (in order)."""
    rejects: list[tuple[str, str, str, str]] = []
    ids_by_path = files[["path", *id_columns]]
    versions_by_path = files[[c for c in ("path", VERSION_COLUMN) if c in files.columns]]
    planned = dict(zip(files["path"], files["image_id"])) if "image_id" in files.columns else {}
    tries = dict(zip(files["path"], files["attempt"])) if "attempt" in files.columns else {}
    if "duplicate_of" in files.columns:
        marked = files["duplicate_of"].notna()
        rejects += [
            (i, p, f"duplicate of {d} (same bytes, predicted once)", RejectKind.DUPLICATE.value)
            for i, p, d in zip(
                files.loc[marked, "image_id"], files.loc[marked, "path"], files.loc[marked, "duplicate_of"]
            )
        ]
        files = files.loc[~marked].reset_index(drop=True)
    arrays: list[np.ndarray] = []
    kept: list[tuple[int, str]] = []
    first_path: dict[str, str] = {}  # a file that changed after planning may repeat another one's bytes
    sources: list[tuple[tuple[int, int], str]] = []  # source size and format of each kept image
    outcomes = decoded if decoded is not None else _decode_rows(files, predictor.contract.decode_spec(), options)
    for i, outcome in enumerate(outcomes):
        if not outcome.ok or outcome.array is None:
            kind = outcome.kind.value if outcome.kind else RejectKind.CORRUPT.value
            # unread bytes (too large, time limit, ...) keep the id the plan hashed: the next run compares it
            rejects.append((outcome.image_id or planned.get(outcome.path, ""), outcome.path, outcome.reason, kind))
        elif outcome.image_id in first_path:
            rejects.append(
                (
                    outcome.image_id,
                    outcome.path,
                    f"duplicate of {masking.path(first_path[outcome.image_id])} (same bytes, predicted once)",
                    RejectKind.DUPLICATE.value,
                )
            )
        else:
            first_path[outcome.image_id] = outcome.path
            arrays.append(outcome.array)
            kept.append((i, outcome.image_id))
            sources.append(((outcome.width, outcome.height), outcome.format))
    contract = predictor.contract
    classes = contract.classes
    images = np.stack(arrays) if arrays else np.zeros((0,))
    rows = files.iloc[[i for i, _ in kept]].reset_index(drop=True)
    copies = None
    if lookup is not None and arrays:  # the reuse check's image work runs while the model predicts
        shown = [masking.path(p) for p in rows["path"]]
        carried = masking.apply(rows[id_columns])  # as the tables show them
        ids = [json.dumps(dict(zip(id_columns, row))) for row in carried.itertuples(index=False)]
        copies = _BESIDE.submit(lookup.copies, [image_id for _, image_id in kept], shown, images, ids)
    vectors = None
    if arrays and options.embeddings:
        probs, vectors = predictor.predict_with_embeddings(images, options.batch_size)
    else:
        probs = predictor.predict_arrays(images, options.batch_size) if arrays else np.zeros((0, len(classes)))
    flips = options.review_flips and contract.flips_preserve_label() and len(arrays) > 0
    mirrored = predictor.predict_mirrored(images, options.batch_size) if flips else None
    stamp = {
        "model_name": model.name,
        "model_version": model.version,
        "run_id": model.run_id,
        "scored_at": datetime.now(UTC),
        "flow_run_id": options.flow_run_id,
    }
    predictions = pd.DataFrame(
        {
            "image_id": [image_id for _, image_id in kept],
            "path": rows["path"],
            **{column: rows[column] for column in id_columns},
        }
    )
    if VERSION_COLUMN in files.columns:  # objects: the version scored, so the next run need not read it again
        predictions[VERSION_COLUMN] = rows[VERSION_COLUMN].to_numpy()
    columns = prediction_columns(
        probs, classes, options.top_k, options.review_below, contract.points(), mirrored, options.review_margin
    )
    predictions = pd.concat([predictions, columns], axis=1)
    predictions["explanation"] = _explain(explainer, images, predictions, model, options)
    notes = None
    if lookup is not None and copies is not None:
        notes = lookup.annotate(copies.result(), predictions["label"].tolist(), vectors)
        for column in ("phash", "neighbour_label", "neighbour_agreement", "duplicate_of", "duplicate_kind"):
            predictions[column] = notes[column].to_numpy()
    drift = (
        DriftSample.of(
            predictions["label"].tolist(),
            predictions["confidence"].to_numpy(),
            images,
            [size for size, _ in sources],
            [fmt for _, fmt in sources],
            vectors,
        )
        if arrays
        else DriftSample()
    )
    halves = list(vectors.astype(np.float16)) if vectors is not None else []  # as the side tables keep them
    if vectors is not None:  # the sinks keep them in their embeddings side table
        predictions[EMBEDDING] = pd.Series(halves, index=predictions.index, dtype=object)
    reject_frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS[:-1])
    reject_frame["attempts"] = [int(tries.get(p, 1)) for p in reject_frame["path"]]
    if id_columns:
        reject_frame = reject_frame.merge(ids_by_path, on="path", how="left")
    if VERSION_COLUMN in versions_by_path.columns:
        reject_frame = reject_frame.merge(versions_by_path, on="path", how="left")
    for key, value in stamp.items():
        predictions[key] = value
        reject_frame[key] = value
    for frame in (predictions, reject_frame):  # set when a later row for the same path replaces this one
        frame["superseded_at"] = pd.Series(pd.NaT, index=frame.index, dtype=frame["scored_at"].dtype)
    predictions, reject_frame = masking.apply(predictions), masking.apply(reject_frame)
    history = None
    if notes is not None and vectors is not None:  # what the version's history keeps (no path)
        history = notes[HISTORY_COLUMNS[:-1]].assign(scored_at=predictions["scored_at"].to_numpy())
        history[EMBEDDING] = halves
    return Scored(predictions, reject_frame, drift, history)


def _explain(
    explainer: Predictor | None, images: np.ndarray, predictions: pd.DataFrame, model: ModelRef, options: ScoringOptions
) -> pd.Series:
    """Write a Grad-CAM overlay (for the predicted class) of each row `options.explain` names; the column says
    where. Named by content and version, so a re-run writes the same file again, never a second one."""
    from cnn.trust.explain import heatmaps, overlay, save_jpeg

    column = pd.Series(None, index=predictions.index, dtype=object)
    if explainer is None or options.explain == "none" or not options.explain_dir or not len(predictions):
        return column
    wanted = predictions["needs_review"].to_numpy(bool) if options.explain == "review" else np.ones(len(images), bool)
    rows = np.flatnonzero(wanted)
    if not len(rows):
        return column
    classes = explainer.contract.classes
    targets = [classes.index(label) for label in predictions["label"].iloc[rows]]
    maps = heatmaps(explainer, images[rows], targets)
    for row, heat in zip(rows, maps):
        name = f"{predictions['image_id'].iloc[row][:20]}-{model.name}-v{model.version}.jpg"
        path = str(save_jpeg(overlay(images[row], heat), storage.join(options.explain_dir, name)))
        base = options.explain_base.rstrip("/")
        column.iloc[row] = path[len(base) + 1 :] if base and path.startswith(base + "/") else path
    return column


def summarise(
    results: Sequence[ShardResult], plan: ShardPlan, model: ModelRef, seconds: float, tables: list[str]
) -> ScoringSummary:
    """Combine the shards of a run into one summary."""
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for result in results:
        labels.update(result.labels)
        kinds.update(result.rejects_by_kind)
    precision = model.precision if model.backend == "torch" else f"{model.precision} on {model.backend}"
    if model.compile:
        failed = any(r.compile_failed for r in results)
        precision += ", eager (torch.compile failed, see the log)" if failed else ", compiled"
    return ScoringSummary(
        model=model.label,
        precision=precision,
        precision_reason=model.precision_reason,
        files=plan.files,
        predicted=sum(r.predicted for r in results),
        rejected=sum(r.rejected for r in results),
        skipped=plan.skipped,
        retried=plan.retried,
        needs_review=sum(r.needs_review for r in results),
        seconds=seconds,
        labels=dict(labels),
        rejects_by_kind=dict(kinds),
        tables=tables,
        copies=sum(r.copies for r in results),
    )


def merged_drift(results: Sequence[ShardResult]) -> DriftSample:
    """The run's drift sample: every shard's, together."""
    sample = DriftSample()
    for result in results:
        if result.drift is not None:
            sample = sample.merge(result.drift)
    return sample

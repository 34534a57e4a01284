"""Scoring one shard: decode its files (the ingest decoder, in parallel), predict in batches, add the review
reasons, the similar cases, the reuse check and the overlays, and commit the rows to every sink. Every input of the
shard ends up exactly once, as a prediction or a reject.

A `Scorer` holds what a process scores with (the loaded model, the explainer, the lookup, the masking) and its two
helper threads: the reuse check beside the model's forward pass, and the next shard's decoding beside this shard's
inference. An orchestrator keeps one per run and process, and calls `score_shard` once per shard of the plan
(anywhere: shards share no state but what the sinks and the run folder hold).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from cnn.batch.masking import Masking
from cnn.batch.run import ModelRef, ScoringOptions, ShardPlan, ShardResult
from cnn.batch.sinks import Sink
from cnn.batch.tables import EMBEDDING, REJECT_COLUMNS, SIMILARITY_COLUMNS, write_parquet
from cnn.fsio import atomic_path
from cnn.infer.predictions import prediction_columns
from cnn.infer.predictor import Predictor
from cnn.io import storage
from cnn.io.decode import DecodeSpec, RejectKind
from cnn.io.inputs import VERSION_COLUMN
from cnn.io.pool import DecodeOutcome, decode_many
from cnn.metrics.drift import DriftSample
from cnn.similarity.history import HISTORY_COLUMNS, History
from cnn.similarity.index import search_in_one_thread
from cnn.similarity.reuse import Copies, Lookup
from cnn.trust.explain import heatmaps, overlay, save_jpeg


@dataclass(frozen=True)
class Scored:
    """One shard's rows, and what it adds to the run's drift check and to the version's history."""

    predictions: pd.DataFrame
    rejects: pd.DataFrame
    drift: DriftSample | None = None
    history: pd.DataFrame | None = None  # HISTORY_COLUMNS + embedding


@dataclass
class _Decoded:
    """A shard's decoded images (in row order of the rows kept), and the rejects decoding found."""

    rows: pd.DataFrame  # the kept files' rows
    image_ids: list[str]
    images: np.ndarray  # (N, H, W, C) uint8, or (0,)
    sizes: list[tuple[int, int]]
    formats: list[str]
    rejects: list[tuple[str, str, str, str]]  # image_id, path, reason, reject_kind


class DecodeAhead:
    """The next shard's decoding, on a thread of its own beside this shard's inference: one shard ahead at most."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, "decode-ahead")
        self._pending: dict[tuple[str, int], Future[list[DecodeOutcome]]] = {}

    def start(self, key: tuple[str, int], files: pd.DataFrame, spec: DecodeSpec, options: ScoringOptions) -> None:
        self._pending.clear()  # an older one was never asked for (a retried or failed run)
        self._pending[key] = self._pool.submit(decode_rows, files, spec, options)

    def take(self, key: tuple[str, int], files: pd.DataFrame) -> list[DecodeOutcome] | None:
        """The outcomes started for `key`, when they are of these files (its exceptions are this shard's)."""
        ahead = self._pending.pop(key, None)
        if ahead is None:
            return None
        outcomes = ahead.result()
        return outcomes if [o.path for o in outcomes] == _to_decode(files)["path"].tolist() else None

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class RunHistory:
    """The history rows that other shards of this run committed so far (ScoringOptions.history_dir): shards that ran
    before in this process or elsewhere (shards running at the same time do not see each other). A part never
    changes once written, so each is read once per process."""

    def __init__(self) -> None:
        self._parts: dict[Path, pd.DataFrame] = {}

    def rows(self, folder: Path, shard: int) -> pd.DataFrame:
        parts = [p for p in sorted(folder.glob("shard-*.parquet")) if p.name != f"shard-{shard:06d}.parquet"]
        for gone in [p for p in self._parts if p not in parts]:  # another run's, or merged into the history
            del self._parts[gone]
        for part in parts:
            if part not in self._parts:
                self._parts[part] = pd.read_parquet(part, columns=HISTORY_COLUMNS[:-1])
        frames = [self._parts[p] for p in parts]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=HISTORY_COLUMNS[:-1])


@dataclass
class Scorer:
    """What a process scores shards with: the pinned version (`model`) run by `predictor`; `explainer` (the unfused
    model) draws the heat maps `options.explain` asks for; `lookup` (the version's training reference and history)
    adds the similar cases and the reuse check; `masking` writes the columns it names as pseudonyms."""

    predictor: Predictor
    model: ModelRef
    options: ScoringOptions
    masking: Masking = field(default_factory=Masking)
    explainer: Predictor | None = None
    lookup: Lookup | None = None
    ahead: DecodeAhead = field(default_factory=DecodeAhead, init=False, repr=False)
    run_history: RunHistory = field(default_factory=RunHistory, init=False, repr=False)
    _beside: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, "reuse-check", search_in_one_thread), init=False, repr=False
    )

    def close(self) -> None:
        """End the helper threads."""
        self.ahead.close()
        self._beside.shutdown(wait=False, cancel_futures=True)

    # --- a shard, as named steps --------------------------------------------------------------------------------

    def score_shard(self, plan: ShardPlan, shard: int, sinks: Sequence[Sink]) -> ShardResult:
        """Score one shard of the plan and commit it to every sink (one transaction or one atomic part file each)."""
        start = time.perf_counter()
        files = plan.rows(shard)
        lookup = self._lookup_for(shard)
        decoded = self._decode_shard(plan, shard, files)
        waited = time.perf_counter() - start
        self._decode_next(plan, shard)
        scored = self.score_files(files, list(plan.id_columns), decoded, lookup, functools.partial(planned_owner, plan))
        for sink in sinks:
            sink.commit(shard, scored.predictions, scored.rejects, plan.key)
        _release_copies(files)  # committed: the plan's copies of this shard's objects are done with
        self._keep_history(shard, scored)  # after the commit: only what was committed
        return _result(files, scored, time.perf_counter() - start, waited, self.predictor.compile_failed)

    def _lookup_for(self, shard: int) -> Lookup | None:
        """The lookup, with what earlier shards of this run scored."""
        if self.lookup is None or not self.options.history_dir:
            return self.lookup
        return self.lookup.with_run(self.run_history.rows(Path(self.options.history_dir), shard))

    def _decode_shard(self, plan: ShardPlan, shard: int, files: pd.DataFrame) -> list[DecodeOutcome]:
        """The shard's decoded files: taken from the decoding started during the previous shard's inference where
        there is one for the same files, else decoded now."""
        started = self.ahead.take((plan.path, shard), files)
        return started if started is not None else decode_rows(files, self._spec, self.options)

    def _decode_next(self, plan: ShardPlan, shard: int) -> None:
        if self.options.decode_ahead and shard + 1 < plan.shards:
            self.ahead.start((plan.path, shard + 1), plan.rows(shard + 1), self._spec, self.options)

    def _keep_history(self, shard: int, scored: Scored) -> None:
        if scored.history is not None and self.options.history_dir:
            with atomic_path(Path(self.options.history_dir) / f"shard-{shard:06d}.parquet") as tmp:
                write_parquet(scored.history, tmp)

    @property
    def _spec(self) -> DecodeSpec:
        return self.predictor.contract.decode_spec()

    # --- a shard's rows -----------------------------------------------------------------------------------------

    def score_files(
        self,
        files: pd.DataFrame,
        id_columns: list[str],
        decoded: list[DecodeOutcome] | None = None,
        lookup: Lookup | None = None,
        owner: Callable[[str, str], str | None] | None = None,
    ) -> Scored:
        """A prediction or a reject for each row of `files` (rows the plan marked `same_bytes_as` an earlier row
        become "duplicate" rejects without being decoded), the shard's drift sample and its history rows.
        `decoded` holds the outcomes of the rows to decode where they were decoded already (in order); `owner(image_id,
        path)` names the file of the run that these bytes belong to, if another (for a file changed since planning)."""
        lookup = lookup if lookup is not None else self.lookup
        listed, marked = files, _planned_duplicates(files)
        files = files.loc[~_marked(files)].reset_index(drop=True)
        outcomes = decoded if decoded is not None else decode_rows(files, self._spec, self.options)
        kept = self._kept(files, outcomes, owner)
        copies = self._start_reuse_check(kept, id_columns, lookup)
        probs, vectors, mirrored = self._predict(kept.images)
        predictions = self._prediction_rows(files, kept, id_columns, probs, mirrored)
        notes = None
        if lookup is not None and copies is not None:
            notes = lookup.annotate(copies.result(), predictions["label"].tolist(), vectors)
            for column in SIMILARITY_COLUMNS:
                predictions[column] = notes[column].to_numpy()
        drift = self._drift(kept, predictions, vectors)
        halves = list(vectors.astype(np.float16)) if vectors is not None else []  # as the side tables keep them
        if vectors is not None:  # the sinks keep them in their embeddings side table
            predictions[EMBEDDING] = pd.Series(halves, index=predictions.index, dtype=object)
        rejects = self._reject_rows(listed, marked + kept.rejects, id_columns)
        _stamp(predictions, rejects, self.model, self.options)
        predictions, rejects = self.masking.apply(predictions), self.masking.apply(rejects)
        history = None
        if notes is not None and vectors is not None:  # what the version's history keeps (no path)
            history = notes[HISTORY_COLUMNS[:-1]].assign(scored_at=predictions["scored_at"].to_numpy())
            history[EMBEDDING] = halves
        return Scored(predictions, rejects, drift, history)

    def _kept(
        self, files: pd.DataFrame, outcomes: list[DecodeOutcome], owner: Callable[[str, str], str | None] | None = None
    ) -> _Decoded:
        """The decoded images, each distinct image once; unreadable files and repeats become rejects. A file whose
        bytes changed since planning is judged by what was decoded: where they are another planned file's bytes, it
        is that file's duplicate (its row would otherwise take that file's: same bytes, model and version)."""
        planned = dict(zip(files["path"], files["image_id"])) if "image_id" in files.columns else {}
        rejects: list[tuple[str, str, str, str]] = []
        arrays, positions, image_ids, sizes, formats = [], [], [], [], []
        first_path: dict[str, str] = {}  # a file that changed after planning may repeat another one's bytes
        for i, outcome in enumerate(outcomes):
            if not outcome.ok or outcome.array is None:
                kind = outcome.kind.value if outcome.kind else RejectKind.CORRUPT.value
                # unread bytes (too large, time limit, ...) keep the id the plan hashed: the next run compares it
                rejects.append((outcome.image_id or planned.get(outcome.path, ""), outcome.path, outcome.reason, kind))
            elif (earlier := _earlier(first_path, planned, outcome, owner)) is not None:
                reason = f"duplicate of {self.masking.path(earlier)} (same bytes, predicted once)"
                rejects.append((outcome.image_id, outcome.path, reason, RejectKind.DUPLICATE.value))
            else:
                first_path[outcome.image_id] = outcome.path
                arrays.append(outcome.array)
                positions.append(i)
                image_ids.append(outcome.image_id)
                sizes.append((outcome.width, outcome.height))
                formats.append(outcome.format)
        rows = files.iloc[positions].reset_index(drop=True)
        images = np.stack(arrays) if arrays else np.zeros((0,))
        return _Decoded(rows, image_ids, images, sizes, formats, rejects)

    def _start_reuse_check(self, kept: _Decoded, id_columns: list[str], lookup: Lookup | None) -> Future[Copies] | None:
        """The reuse check's image work, on its thread while the model predicts."""
        if lookup is None or not kept.image_ids:
            return None
        shown = [self.masking.path(p) for p in kept.rows["path"]]
        carried = self.masking.apply(kept.rows[id_columns])  # as the tables show them
        ids = [json.dumps(dict(zip(id_columns, row))) for row in carried.itertuples(index=False)]
        return self._beside.submit(lookup.copies, kept.image_ids, shown, kept.images, ids)

    def _predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(calibrated probabilities, embeddings where kept, probabilities of the mirror images where they count)."""
        options, predictor = self.options, self.predictor
        if not len(images):
            return np.zeros((0, len(predictor.contract.classes))), None, None
        vectors = None
        if options.embeddings:
            probs, vectors = predictor.predict_with_embeddings(images, options.batch_size)
        else:
            probs = predictor.predict_arrays(images, options.batch_size)
        flips = options.review_flips and predictor.contract.flips_preserve_label()
        mirrored = predictor.predict_mirrored(images, options.batch_size) if flips else None
        return probs, vectors, mirrored

    def _prediction_rows(
        self,
        files: pd.DataFrame,
        kept: _Decoded,
        id_columns: list[str],
        probs: np.ndarray,
        mirrored: np.ndarray | None,
    ) -> pd.DataFrame:
        contract, options = self.predictor.contract, self.options
        rows = kept.rows
        predictions = pd.DataFrame(
            {"image_id": kept.image_ids, "path": rows["path"], **{column: rows[column] for column in id_columns}}
        )
        if VERSION_COLUMN in files.columns:  # objects: the version scored, so the next run need not read it again
            predictions[VERSION_COLUMN] = rows[VERSION_COLUMN].to_numpy()
        columns = prediction_columns(
            probs,
            contract.classes,
            options.top_k,
            options.review_below,
            contract.points(),
            mirrored,
            options.review_margin,
        )
        predictions = pd.concat([predictions, columns], axis=1)
        predictions["explanation"] = self._explain(kept.images, predictions)
        return predictions

    def _reject_rows(
        self, files: pd.DataFrame, rejects: list[tuple[str, str, str, str]], id_columns: list[str]
    ) -> pd.DataFrame:
        tries = dict(zip(files["path"], files["attempt"])) if "attempt" in files.columns else {}
        frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS[:-1])
        frame["attempts"] = [int(tries.get(p, 1)) for p in frame["path"]]
        if id_columns:
            frame = frame.merge(files[["path", *id_columns]].drop_duplicates("path"), on="path", how="left")
        if VERSION_COLUMN in files.columns:
            frame = frame.merge(files[["path", VERSION_COLUMN]].drop_duplicates("path"), on="path", how="left")
        return frame

    def _drift(self, kept: _Decoded, predictions: pd.DataFrame, vectors: np.ndarray | None) -> DriftSample:
        if not kept.image_ids:
            return DriftSample()
        labels, confidence = predictions["label"].tolist(), predictions["confidence"].to_numpy()
        return DriftSample.of(labels, confidence, kept.images, kept.sizes, kept.formats, vectors)

    def _explain(self, images: np.ndarray, predictions: pd.DataFrame) -> pd.Series:
        """Write a Grad-CAM overlay (for the predicted class) of each row `options.explain` names; the column says
        where. Named by content and version, so a re-run writes the same file again, never a second one."""
        options, model, explainer = self.options, self.model, self.explainer
        column = pd.Series(None, index=predictions.index, dtype=object)
        if explainer is None or options.explain == "none" or not options.explain_dir or not len(predictions):
            return column
        wanted = (
            predictions["needs_review"].to_numpy(bool) if options.explain == "review" else np.ones(len(images), bool)
        )
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


def decode_rows(files: pd.DataFrame, spec: DecodeSpec, options: ScoringOptions) -> list[DecodeOutcome]:
    """Decode the rows' files (all but those the plan marked as repeats of an earlier row); an object the plan kept
    a local copy of is read from that copy (and named by its URL in the outcome)."""
    rows = _to_decode(files)
    paths = rows["path"].tolist()
    reads = [c or p for c, p in zip(_copies(rows), paths)]
    outcomes = decode_many(reads, spec, options.decode_workers, time_limit_s=options.decode_time_limit_s)
    return [o if o.path == p else replace(o, path=p) for o, p in zip(outcomes, paths)]


def planned_owner(plan: ShardPlan, image_id: str, path: str) -> str | None:
    """The first file of `plan`, other than `path`, planned with these bytes (none: None)."""
    files = plan.frame()
    same = files[(files["image_id"] == image_id) & (files["path"] != path)]
    return str(same["path"].iloc[0]) if len(same) else None


def _earlier(
    first_path: dict[str, str],
    planned: dict[str, str],
    outcome: DecodeOutcome,
    owner: Callable[[str, str], str | None] | None,
) -> str | None:
    """The file whose duplicate `outcome` is: one decoded before it in this shard with the same bytes, else (when its
    bytes changed since planning) another planned file with those bytes."""
    if outcome.image_id in first_path:
        return first_path[outcome.image_id]
    changed = planned.get(outcome.path, outcome.image_id) != outcome.image_id
    return owner(outcome.image_id, outcome.path) if changed and owner is not None else None


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


def _marked(files: pd.DataFrame) -> pd.Series:
    """The rows the plan marked as repeats of an earlier row's bytes."""
    if "same_bytes_as" not in files.columns:
        return pd.Series(False, index=files.index)
    return files["same_bytes_as"].notna()


def _planned_duplicates(files: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    rows = files.loc[_marked(files)]
    return [
        (i, p, f"duplicate of {d} (same bytes, predicted once)", RejectKind.DUPLICATE.value)
        for i, p, d in zip(rows["image_id"], rows["path"], rows["same_bytes_as"])
    ]


def _to_decode(files: pd.DataFrame) -> pd.DataFrame:
    return files.loc[~_marked(files)]


def _copies(files: pd.DataFrame) -> list[str]:
    if "local_copy" not in files.columns:
        return [""] * len(files)
    return [str(c) for c in files["local_copy"].fillna("")]


def _release_copies(files: pd.DataFrame) -> None:
    for copy in filter(None, _copies(files)):
        Path(copy).unlink(missing_ok=True)


def _stamp(predictions: pd.DataFrame, rejects: pd.DataFrame, model: ModelRef, options: ScoringOptions) -> None:
    """The model version, run and time on every row; `superseded_at` is set when a later row replaces one."""
    stamp = {
        "model_name": model.name,
        "model_version": model.version,
        "run_id": model.run_id,
        "scored_at": datetime.now(UTC),
        "flow_run_id": options.flow_run_id,
    }
    for key, value in stamp.items():
        predictions[key] = value
        rejects[key] = value
    for frame in (predictions, rejects):
        frame["superseded_at"] = pd.Series(pd.NaT, index=frame.index, dtype=frame["scored_at"].dtype)


def _result(files: pd.DataFrame, scored: Scored, seconds: float, waited: float, compile_failed: bool) -> ShardResult:
    predictions, rejects = scored.predictions, scored.rejects
    return ShardResult(
        files=len(files),
        predicted=len(predictions),
        rejected=len(rejects),
        seconds=seconds,
        needs_review=int(predictions["needs_review"].sum()),
        labels={str(k): int(v) for k, v in predictions["label"].value_counts().items()},
        rejects_by_kind={str(k): int(v) for k, v in rejects["reject_kind"].value_counts().items()},
        compile_failed=compile_failed,
        drift=scored.drift,
        copies=int(predictions["duplicate_kind"].notna().sum()) if "duplicate_kind" in predictions else 0,
        decode_wait_s=waited,
    )

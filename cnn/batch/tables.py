"""The prediction tables' schema, defined once: columns and keys, where each side table lives beside its main
table, and the tables every sink derives from the predictions (the review queue, the reused photos, the history
of superseded rows)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import IO, Literal

import pandas as pd

from cnn.frames import among
from cnn.io import storage
from cnn.io.inputs import VERSION_COLUMN

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
# what the reuse check and the similar cases add to a prediction row (cnn.similarity.reuse.Lookup.annotate)
SIMILARITY_COLUMNS = ["phash", "neighbour_label", "neighbour_agreement", "duplicate_of", "duplicate_kind"]
# A row's identity: its path and its bytes, per model version. Two paths with the same bytes never share a row (a
# copy scored in a later run keeps its own row; the earlier path keeps its), and a path whose bytes changed gets a
# new row that supersedes its old one.
KEY = ["path", "image_id", "model_name", "model_version"]
# What a reviewer's answer is about: an image's bytes as one version read them, whatever path holds them (a Label
# Studio task carries no path); it applies to every row of those bytes.
ANSWER_KEY = ["image_id", "model_name", "model_version"]
REVIEW_COLUMN = "reviewed_label"  # the review table's column a reviewer fills in; a run never overwrites it
# what a review pull (cnn.review.answers) writes beside it: label | unusable | none_of_these | disputed, the Label
# Studio user ids that answered, and when; a scoring run never overwrites these either
REVIEWER_COLUMNS = [REVIEW_COLUMN, "review_verdict", "reviewed_by", "reviewed_at"]
DRIFT_KEY = ["flow_run_id", "name"]
EMBEDDING = "embedding"  # a prediction frame's column of float16 vectors, kept in the embeddings side table
REJECT_KEY = ["path", "model_name", "model_version"]
CURRENT_COLUMNS = ["path", "image_id", "model_version", "reject_kind", "attempts", "scored_at", VERSION_COLUMN]
_TIMES = ("scored_at", "superseded_at")
LATER_COLUMNS = ("reject_kind", "attempts", "superseded_at")  # columns a table written by an earlier version may lack
DUPLICATE_COLUMNS = ["image_id", "path", "duplicate_kind", "duplicate_of", "earlier_image_id", "earlier_source"]

SideTable = Literal["rejects", "review", "duplicates", "embeddings", "drift"]
TableLayout = Literal["file", "sql", "partitioned"]


def side_table(main: str, kind: SideTable, layout: TableLayout = "file") -> str:
    """Where the side table `kind` of the main table `main` lives (the one rule for every sink): beside a file or
    object `X.parquet|csv` as `X.<kind>.parquet|csv` (embeddings always Parquet), beside a SQL table `T` as `T_<kind>`,
    inside a partitioned table's folder or prefix as `_<kind>/` (rejects and embeddings, one file per shard) or
    `_<kind>.parquet`."""
    if layout == "sql":
        return f"{main}_{kind}"
    if layout == "partitioned":
        return storage.join(main, f"_{kind}" if kind in ("rejects", "embeddings") else f"_{kind}.parquet")
    stem, _, suffix = main.rpartition(".")
    return f"{stem}.{kind}.{'parquet' if kind == 'embeddings' else suffix}"


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """A table as Parquet, vectors without dictionary encoding: Arrow tries to dictionary-encode every float of every
    vector, half the time of writing an embeddings table, for values that almost never repeat."""
    plain = [str(c) for c in frame.columns if c != EMBEDDING] if EMBEDDING in frame.columns else True
    frame.to_parquet(path, index=False, use_dictionary=plain)


def split_embeddings(predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions without the vectors, the side table's rows: KEY, dim, embedding float16)."""
    if EMBEDDING not in predictions.columns:
        return predictions, pd.DataFrame()
    side = predictions[[*KEY, "scored_at", EMBEDDING]].copy()
    side.insert(len(KEY), "dim", [len(v) for v in side[EMBEDDING]])
    return predictions.drop(columns=EMBEDDING), side


def with_paths(embeddings: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """An embeddings table with every row's `path`: tables written while a row's key was its bytes alone (before
    2026-12) kept no path beside a vector; each such row takes the path of the prediction it was written with
    (same bytes, version and time)."""
    if embeddings.empty or ("path" in embeddings.columns and embeddings["path"].notna().all()):
        return embeddings
    missing = embeddings["path"].isna() if "path" in embeddings.columns else pd.Series(True, index=embeddings.index)
    if predictions.empty:
        return embeddings.loc[~missing]
    match = [*ANSWER_KEY, "scored_at"]
    owners = predictions[[*match, "path"]].assign(scored_at=as_time(predictions["scored_at"]))
    owners = owners.set_index(row_keys(owners, match))["path"]
    owners = owners[~owners.index.duplicated(keep="last")]
    old = embeddings.loc[missing, match].assign(scored_at=as_time(embeddings.loc[missing, "scored_at"]))
    out = embeddings.copy()
    if "path" not in out.columns:
        out.insert(0, "path", pd.Series(None, index=out.index, dtype=object))
    out.loc[missing, "path"] = row_keys(old, match).map(owners.to_dict()).to_numpy()
    return out.loc[out["path"].notna()]  # a vector whose prediction is gone has no row to belong to


def row_keys(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """The columns' values as one string per row (joined column by column: a row-wise join is ten times slower)."""
    text = frame[columns].astype(str).fillna("")
    key = text[columns[0]]
    for column in columns[1:]:
        key = key + "\x1f" + text[column]
    return key


def as_time(values: pd.Series) -> pd.Series:
    """UTC timestamps from a typed column or from CSV text ("" = none)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
    return pd.to_datetime(values.replace("", None), utc=True, format="ISO8601")


def _column(frame: pd.DataFrame, name: str, default: object) -> pd.Series:
    """A column, with `default` for rows (or tables, written before it existed) without a value."""
    if name not in frame.columns:
        return pd.Series(default, index=frame.index)
    return frame[name].replace("", None).fillna(default)


_FORMULA = re.compile(r"^[=+\-@\t\r]")  # what a spreadsheet reads as the start of a formula (OWASP, CSV injection)
_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?([eE][-+]?\d+)?$")  # a plain number is data, never a formula


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with every text cell that a spreadsheet would run as a formula (starting with = + - @, a tab or a
    carriage return, and not a plain number) prefixed with a single quote, as OWASP recommends for CSV files that
    people open in Excel or LibreOffice: a carried claim id `=HYPERLINK(...)` shows as text instead of running."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype != object and not pd.api.types.is_string_dtype(out[column]):
            continue
        values = out[column]
        risky = values.map(lambda v: isinstance(v, str) and bool(_FORMULA.match(v)) and not _NUMBER.match(v))
        if risky.any():
            out.loc[risky, column] = "'" + values[risky].astype(str)
    return out


def write_csv(frame: pd.DataFrame, target: Path | IO[bytes]) -> None:
    """A table as CSV, spreadsheet-safe (`spreadsheet_safe`): the one way the sinks write CSV."""
    spreadsheet_safe(frame).to_csv(target, index=False)


def read_csv_table(source: Path | IO[bytes]) -> pd.DataFrame:
    """A prediction table from CSV: every column as text (a claim number 007123 stays 007123, and nothing is
    re-parsed between runs) except the times, which the history is computed from."""
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # an earlier run with nothing to write left an empty file
        return pd.DataFrame()
    for column in _TIMES:
        if column in frame.columns:
            frame[column] = as_time(frame[column])
    return frame


def latest_per_path(predictions: pd.DataFrame, rejects: pd.DataFrame) -> pd.DataFrame:
    """CURRENT_COLUMNS for the newest row of each (model, path) across both tables."""
    frames = []
    for frame, is_reject in ((predictions, False), (rejects, True)):
        if frame.empty:
            continue
        rows = pd.DataFrame(
            {
                "model_name": frame["model_name"].astype(str),
                "path": frame["path"].astype(str),
                "image_id": frame["image_id"].fillna("").astype(str),
                "model_version": frame["model_version"].astype(str),
                "reject_kind": _column(frame, "reject_kind", "corrupt").astype(str) if is_reject else "",
                "attempts": pd.to_numeric(_column(frame, "attempts", 1), errors="coerce") if is_reject else 0,
                "scored_at": as_time(frame["scored_at"]),
                VERSION_COLUMN: _column(frame, VERSION_COLUMN, "").astype(str),
            }
        )
        if "superseded_at" in frame.columns:
            rows = rows[as_time(frame["superseded_at"]).isna().to_numpy()]
        frames.append(rows)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ["model_name", *CURRENT_COLUMNS]})
    rows = pd.concat(frames, ignore_index=True).sort_values("scored_at", kind="stable")
    rows["attempts"] = rows["attempts"].fillna(1).astype(int)
    return rows.drop_duplicates(["model_name", "path"], keep="last").reset_index(drop=True)


def duplicates(predictions: pd.DataFrame) -> pd.DataFrame:
    """The current predictions that repeat an earlier image (reused photos), with the earlier image's id and where
    it was (training, scored, this run) pulled out of `duplicate_of`; carried id columns and the stamp stay."""
    if predictions.empty or "duplicate_kind" not in predictions.columns:
        return pd.DataFrame(columns=[*DUPLICATE_COLUMNS, "model_name", "model_version"])
    found = predictions.loc[predictions["duplicate_kind"].notna() & _live(predictions)]
    found = _without(found, "top_k", "review_reason", "explanation", "phash")
    earlier = [json.loads(str(v)) for v in found["duplicate_of"]]
    found["earlier_image_id"] = [e.get("image_id") for e in earlier]
    found["earlier_source"] = [e.get("source") for e in earlier]
    return found.reset_index(drop=True)


def _live(predictions: pd.DataFrame) -> pd.Series | bool:
    """Which rows are current (no later row replaced them)."""
    return as_time(predictions["superseded_at"]).isna() if "superseded_at" in predictions else True


def _without(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """A copy without the probabilities and these columns (what a side table leaves out)."""
    drop = [c for c in frame.columns if c.startswith("prob_") or c in columns]
    return frame.drop(columns=drop)


def review_queue(predictions: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
    """The current predictions that need review, most urgent first, with `reviewed_label`. What a reviewer wrote
    in `earlier` (the review file as it was) stays: their labels and columns by row key, and reviewed rows whose
    prediction has been replaced since."""
    if predictions.empty or "needs_review" not in predictions.columns:
        queue = pd.DataFrame(columns=[*KEY, REVIEW_COLUMN])
    else:
        flagged = predictions["needs_review"].astype(str).str.lower().isin(["true", "1"])
        queue = _without(predictions.loc[flagged & _live(predictions)], "flow_run_id", "run_id")
        queue[REVIEW_COLUMN] = pd.Series(None, index=queue.index, dtype=object)
    if not earlier.empty and REVIEW_COLUMN in earlier.columns:
        key = KEY if "path" in earlier.columns else ANSWER_KEY  # a review table's rows, or answers (Delta's reviews)
        earlier = earlier.loc[~row_keys(earlier, key).duplicated(keep="last")]
        keyed = earlier.set_index(row_keys(earlier, key))
        theirs = [c for c in earlier.columns if c not in queue.columns or c in REVIEWER_COLUMNS]
        index = row_keys(queue, key)
        for column in theirs:
            queue[column] = index.map(keyed[column].to_dict()).where(among(index, keyed.index), None).to_numpy()
        reviewed = earlier[earlier[REVIEW_COLUMN].fillna("").astype(str).str.strip() != ""]
        queue = pd.concat([queue, reviewed[~among(row_keys(reviewed, key), index)]], ignore_index=True)
    if "urgency" in queue.columns and len(queue):
        queue = queue.assign(_u=pd.to_numeric(queue["urgency"], errors="coerce")).sort_values(
            "_u", ascending=False, na_position="last", kind="stable"
        )
        queue = queue.drop(columns="_u")
    return queue.reset_index(drop=True)


def mark_superseded(predictions: pd.DataFrame, rejects: pd.DataFrame) -> None:
    """Mark each current row that a newer row of its path (per model) follows as superseded at that row's time."""
    rows = []
    for which, frame in enumerate((predictions, rejects)):
        if frame.empty:
            continue
        if "superseded_at" not in frame.columns:
            frame["superseded_at"] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us, UTC]")
        frame["superseded_at"] = as_time(frame["superseded_at"]).astype("datetime64[us, UTC]")
        live = frame["superseded_at"].isna()
        rows.append(
            pd.DataFrame(
                {
                    "which": which,
                    "row": frame.index[live],
                    "model_name": frame.loc[live, "model_name"].astype(str),
                    "path": frame.loc[live, "path"].astype(str),
                    "scored_at": as_time(frame.loc[live, "scored_at"]).astype("datetime64[us, UTC]"),
                }
            )
        )
    if not rows:
        return
    chain = pd.concat(rows, ignore_index=True).sort_values("scored_at", kind="stable")
    chain["next"] = chain.groupby(["model_name", "path"])["scored_at"].shift(-1)
    for which, frame in enumerate((predictions, rejects)):
        later = chain[(chain["which"] == which) & chain["next"].notna()]
        frame.loc[later["row"].to_numpy(), "superseded_at"] = later["next"].to_numpy()

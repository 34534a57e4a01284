"""Find the labelled files of a source: a class-folder tree, a train/val/test tree, or a manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cnn.dataset import SPLITS
from cnn.errors import UserError

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
SOURCE_COLUMNS = ["path", "label", "split", "group", "size_bytes", "mtime_ns", "reviewed"]
REVIEWED_LABEL = "reviewed_label"  # a scoring run's review table, once a reviewer filled this column


@dataclass(frozen=True)
class SourceListing:
    """The files of a source, one row each (see SOURCE_COLUMNS), and how the source was laid out."""

    files: pd.DataFrame
    layout: str  # "class-folders" | "split-folders" | "manifest" | "review" (a filled-in review table)
    root: Path
    skipped: int = 0  # loose files without a class folder, or repeated rows of a manifest


def scan_source(source: str | os.PathLike[str], group_column: str = "group") -> SourceListing:
    """List every candidate file of `source` with its label, preset split and group."""
    root = Path(source).expanduser()
    if not root.exists():
        raise UserError(f"source not found: {root}")
    if root.is_file():
        if root.suffix.lower() not in MANIFEST_SUFFIXES:
            raise UserError(f"source {root} is a file but not a CSV or Parquet manifest")
        listing = _scan_manifest(root.resolve(), group_column)
    elif _split_dirs(root):
        listing = _scan_split_folders(root.resolve())
    else:
        listing = _scan_class_folders(root.resolve())
    if listing.files.empty:
        raise UserError(f"no files found in {root}")
    return listing


def iter_files(folder: Path) -> list[Path]:
    """All non-hidden files below `folder`, sorted, skipping hidden folders."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(root: Path) -> dict[str, Path]:
    """The train/val/test folders of a split layout, or {} when `root` is a class-folder layout."""
    subdirs = _subdirs(root)
    named = {_SPLIT_ALIASES.get(d.name.lower()): d for d in subdirs}
    if subdirs and None not in named and ("train" in named or "test" in named):
        return named  # type: ignore[return-value]  # None is not a key here: checked just above
    return {}


def _class_rows(folder: Path, split: str | None) -> tuple[list[dict[str, object]], int]:
    rows: list[dict[str, object]] = []
    for class_dir in _subdirs(folder):
        for path in iter_files(class_dir):
            rows.append(_row(path, class_dir.name, split, None))
    loose = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return rows, loose


def _scan_class_folders(root: Path) -> SourceListing:
    rows, loose = _class_rows(root, None)
    return SourceListing(_frame(rows), "class-folders", root, loose)


def _scan_split_folders(root: Path) -> SourceListing:
    rows: list[dict[str, object]] = []
    loose = 0
    for split, folder in sorted(_split_dirs(root).items()):
        split_rows, split_loose = _class_rows(folder, split)
        rows += split_rows
        loose += split_loose
    return SourceListing(_frame(rows), "split-folders", root, loose)


def _scan_manifest(manifest: Path, group_column: str) -> SourceListing:
    table = load_manifest_table(manifest)
    if REVIEWED_LABEL in table.columns:
        return _scan_review(manifest, table, group_column)
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise UserError(
            f"manifest {manifest} lacks column(s) {', '.join(missing)}; it has: {', '.join(map(str, table.columns))}"
        )
    if group_column != "group" and group_column not in table.columns:
        raise UserError(f"manifest {manifest} has no group column {group_column!r}")
    splits = table["split"] if "split" in table.columns else pd.Series([None] * len(table))
    groups = table[group_column] if group_column in table.columns else pd.Series([None] * len(table))
    rows = []
    for i, (path, label, split, group) in enumerate(zip(table["path"], table["label"], splits, groups)):
        if _blank(path) or _blank(label):
            raise UserError(f"manifest {manifest} row {i + 2}: empty path or label")
        rows.append(
            _row(
                _resolve(manifest.parent, str(path)),
                str(label).strip(),
                _parse_split(split, manifest, i),
                None if _blank(group) else str(group),
            )
        )
    frame = _frame(rows)
    repeated = int(frame["path"].duplicated().sum())  # a file listed twice is ingested once (first row wins)
    return SourceListing(frame.drop_duplicates("path", ignore_index=True), "manifest", manifest.parent, repeated)


def _scan_review(manifest: Path, table: pd.DataFrame, group_column: str) -> SourceListing:
    """A review table: the rows a reviewer labelled (`reviewed_label`), with that label; the model's own `label`
    is ignored, and rows left blank are skipped."""
    if "path" not in table.columns:
        raise UserError(f"review table {manifest} has no `path` column")
    labelled = table[~table[REVIEWED_LABEL].map(_blank)]
    groups = labelled[group_column] if group_column in labelled.columns else pd.Series([None] * len(labelled))
    rows = [
        _row(_review_path(manifest.parent, str(path)), str(label).strip(), None, None if _blank(g) else str(g), True)
        for path, label, g in zip(labelled["path"], labelled[REVIEWED_LABEL], groups)
    ]
    frame = _frame(rows).drop_duplicates("path", keep="last", ignore_index=True)
    return SourceListing(frame, "review", manifest.parent, len(table) - len(frame))


def _review_path(base: Path, path: str) -> Path:
    """A review table's path: as scoring saw it, so a relative one is relative to where `cnn score` ran (the
    working folder) unless it exists beside the table."""
    beside = _resolve(base, path)
    return beside if beside.exists() or Path(path).is_absolute() else Path(path).expanduser().absolute()


def load_manifest_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest, turning parse errors into a UserError."""
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise UserError(f"cannot read manifest {path}: {exc}") from None


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or str(value).strip() == ""


def _parse_split(value: object, manifest: Path, index: int) -> str | None:
    if _blank(value):
        return None
    split = _SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise UserError(f"manifest {manifest} row {index + 2}: split {value!r} is not one of {', '.join(SPLITS)}")
    return split


def _resolve(base: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate)


def _row(path: Path, label: str, split: str | None, group: str | None, reviewed: bool = False) -> dict[str, object]:
    try:
        stat = path.stat()
        size, mtime = int(stat.st_size), int(stat.st_mtime_ns)
    except OSError:
        size, mtime = -1, -1  # missing: the decoder reports it as a reject
    return {
        "path": str(path.absolute()),
        "label": label,
        "split": split,
        "group": group,
        "size_bytes": size,
        "mtime_ns": mtime,
        "reviewed": reviewed,
    }


def _frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=SOURCE_COLUMNS)
    return frame.astype({"size_bytes": "int64", "mtime_ns": "int64", "reviewed": bool})

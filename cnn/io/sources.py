"""Find the labelled files of a source: a class-folder tree, a train/val/test tree, or a manifest; on local disk or
in an object store (`s3://bucket/prefix`, see cnn/io/storage.py), where an object's version joins its size and time."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from cnn import stopping
from cnn.choices import SPLIT_ALIASES, SPLITS
from cnn.errors import UserError
from cnn.fsio import inside
from cnn.io import storage
from cnn.io.walk import ALLOW_FLAG, walk_files
from cnn.limits import MAX_SOURCE_ENTRIES

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
# version: an object's version id or ETag ("" for a local file, whose size and mtime say when it changed)
SOURCE_COLUMNS = ["path", "label", "split", "group", "size_bytes", "mtime_ns", "version", "reviewed"]
REVIEWED_LABEL = "reviewed_label"  # a scoring run's review table, once a reviewer filled this column
REVIEW_VERDICT = "review_verdict"  # beside it after `cnn review pull`: label | unusable | none_of_these | disputed
EXCLUDING_VERDICTS = ("unusable", "none_of_these")  # never a training label: such a file leaves the dataset


@dataclass(frozen=True)
class SourceListing:
    """The files of a source, one row each (see SOURCE_COLUMNS), and how the source was laid out."""

    files: pd.DataFrame
    layout: str  # "class-folders" | "split-folders" | "manifest" | "review" (a filled-in review table)
    root: Path | str  # a folder, or an object store URL
    skipped: int = 0  # loose files without a class folder, or repeated rows of a manifest
    excluded: tuple[str, ...] = ()  # a review table's files a reviewer called unusable or none of the classes


def scan_source(
    source: str | os.PathLike[str], group_column: str = "group", allow_outside: bool = False
) -> SourceListing:
    """List every candidate file of `source` with its label, preset split and group. Links that leave a folder
    source are not read, and a manifest's or review table's paths must stay in its folder, unless `allow_outside`."""
    source = storage.local_path(str(source))
    if storage.is_url(source):
        listing = _scan_objects(source, group_column)
        if listing.files.empty:
            raise UserError(f"no objects found in {storage.redact(source)}")
        return listing
    root = Path(source).expanduser()
    if not root.exists():
        raise UserError(f"source not found: {root}")
    if root.is_file():
        if root.suffix.lower() not in MANIFEST_SUFFIXES:
            raise UserError(f"source {root} is a file but not a CSV or Parquet manifest")
        listing = _scan_manifest(root.resolve(), group_column, allow_outside)
    elif _split_dirs(root):
        listing = _scan_split_folders(root.resolve(), allow_outside)
    else:
        listing = _scan_class_folders(root.resolve(), allow_outside)
    if listing.files.empty:
        raise UserError(f"no files found in {root}")
    return listing


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(root: Path) -> dict[str, Path]:
    """The train/val/test folders of a split layout, or {} when `root` is a class-folder layout."""
    subdirs = _subdirs(root)
    named = {SPLIT_ALIASES.get(d.name.lower()): d for d in subdirs}
    if subdirs and None not in named and ("train" in named or "test" in named):
        return named  # type: ignore[return-value]  # None is not a key here: checked just above
    return {}


def _class_rows(
    folder: Path, split: str | None, root: Path, allow_outside: bool
) -> tuple[list[dict[str, object]], int]:
    """The rows of a class-folder tree, and the files skipped: loose files and links leading out of `root`."""
    rows: list[dict[str, object]] = []
    loose = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for class_dir in _subdirs(folder):
        found = walk_files(class_dir, root=root, allow_outside=allow_outside)
        found.warn(root)
        loose += len(found.outside)
        rows += [
            _row(os.path.abspath(path), class_dir.name, split, None, stat=(size, mtime))
            for path, size, mtime in zip(found.files, found.sizes, found.mtimes)
        ]
    return rows, loose


def _scan_class_folders(root: Path, allow_outside: bool) -> SourceListing:
    rows, skipped = _class_rows(root, None, root, allow_outside)
    return SourceListing(_frame(rows), "class-folders", root, skipped)


def _scan_split_folders(root: Path, allow_outside: bool) -> SourceListing:
    rows: list[dict[str, object]] = []
    skipped = 0
    for split, folder in sorted(_split_dirs(root).items()):
        split_rows, split_skipped = _class_rows(folder, split, root, allow_outside)
        rows += split_rows
        skipped += split_skipped
    return SourceListing(_frame(rows), "split-folders", root, skipped)


def _scan_objects(url: str, group_column: str) -> SourceListing:
    """A bucket prefix laid out as class folders or split folders (one streamed listing), or a manifest object."""
    if url.lower().endswith(MANIFEST_SUFFIXES):
        return _scan_manifest(url, group_column)
    keys: list[tuple[str, ...]] = []
    objects: list[storage.ObjectInfo] = []
    for parts, found in visible_objects(url):
        if all(parts):  # a key with an empty part (`a//b.png`) names no class folder
            keys.append(parts)
            objects.append(found)
    tops = {parts[0] for parts in keys if len(parts) > 1}
    named = {SPLIT_ALIASES.get(top.lower()) for top in tops}
    split_layout = bool(tops) and None not in named and ("train" in named or "test" in named)
    depth = 3 if split_layout else 2  # split/class/file or class/file
    rows, loose = [], 0
    for parts, found in zip(keys, objects):
        if len(parts) < depth:
            loose += 1
            continue
        label, split = (parts[1], SPLIT_ALIASES[parts[0].lower()]) if split_layout else (parts[0], None)
        rows.append(_object_row(found, label, split, None))
    layout = "split-folders" if split_layout else "class-folders"
    return SourceListing(_frame(rows), layout, url.rstrip("/"), loose)


def visible_objects(url: str) -> Iterator[tuple[tuple[str, ...], storage.ObjectInfo]]:
    """The objects below the prefix `url`, each with its key's parts below it, skipping hidden ones (a part that
    starts with `.`, as on disk); streamed, bounded like a walk (MAX_SOURCE_ENTRIES), and stopped by SIGTERM."""
    prefix = url.rstrip("/")
    for count, found in enumerate(storage.iter_objects(prefix), 1):
        if count > MAX_SOURCE_ENTRIES:
            raise UserError(
                f"{storage.redact(prefix)} holds more than {MAX_SOURCE_ENTRIES:,} objects; score or ingest it in parts"
            )
        if count % 1000 == 0:
            stopping.check()
        parts = tuple(found.url[len(prefix) + 1 :].split("/"))
        if not any(part.startswith(".") for part in parts):
            yield parts, found


def _object_row(
    found: storage.ObjectInfo, label: str, split: str | None, group: str | None, reviewed: bool = False
) -> dict[str, object]:
    return {
        "path": found.url,
        "label": label,
        "split": split,
        "group": group,
        "size_bytes": found.size,
        "mtime_ns": found.mtime_ns,
        "version": found.version,
        "reviewed": reviewed,
    }


def _scan_manifest(manifest: Path | str, group_column: str, allow_outside: bool = False) -> SourceListing:
    table = load_manifest_table(manifest)
    base = _folder_of(manifest)
    if REVIEWED_LABEL in table.columns:
        listing = _scan_review(manifest, base, table, group_column)
        refuse_outside(listing.files["path"], base, "review table", allow_outside)
        return listing
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
                _resolve(base, str(path)),
                str(label).strip(),
                _parse_split(split, manifest, i),
                None if _blank(group) else str(group),
            )
        )
    frame = _frame(rows)
    refuse_outside(frame["path"], base, "manifest", allow_outside)
    repeated = int(frame["path"].duplicated().sum())  # a file listed twice is ingested once (first row wins)
    frame = _with_object_stats(frame.drop_duplicates("path", ignore_index=True))
    return SourceListing(frame, "manifest", base, repeated)


def _scan_review(manifest: Path | str, base: Path | str, table: pd.DataFrame, group_column: str) -> SourceListing:
    """A review table: the rows a reviewer labelled (`reviewed_label`), with that label; the model's own `label`
    is ignored, and rows left blank are skipped."""
    if "path" not in table.columns:
        raise UserError(f"review table {manifest} has no `path` column")
    verdicts = table[REVIEW_VERDICT].astype(str) if REVIEW_VERDICT in table.columns else pd.Series("", table.index)
    excluding = verdicts.isin(EXCLUDING_VERDICTS)
    labelled = table[~table[REVIEWED_LABEL].map(_blank) & ~excluding]
    groups = labelled[group_column] if group_column in labelled.columns else pd.Series([None] * len(labelled))
    rows = [
        _row(_review_path(base, str(path)), str(label).strip(), None, None if _blank(g) else str(g), True)
        for path, label, g in zip(labelled["path"], labelled[REVIEWED_LABEL], groups)
    ]
    frame = _frame(rows).drop_duplicates("path", keep="last", ignore_index=True)
    excluded = tuple(_review_path(base, str(p)) for p in table.loc[excluding, "path"])
    return SourceListing(_with_object_stats(frame), "review", base, len(table) - len(frame), excluded)


def _review_path(base: Path | str, path: str) -> str:
    """A review table's path: as scoring saw it, so a relative one is relative to where `cnn score` ran (the
    working folder) unless it exists beside the table."""
    beside = _resolve(base, path)
    if storage.is_url(beside) or Path(path).is_absolute() or Path(beside).exists():
        return beside
    return str(Path(path).expanduser().absolute())


def refuse_outside(paths: Iterable[str], base: Path | str, kind: str, allow_outside: bool) -> None:
    """A manifest's or review table's rows name files in its own folder (links resolved; for one in an object store,
    objects under its prefix): a table edited by someone else must not pull other files into training or scoring.
    A UserError names the first row outside and the option that allows it."""
    if allow_outside:
        return
    outside = [p for p in paths if not _within(str(p), base)]
    if outside:
        first = storage.redact(outside[0]) if storage.is_url(outside[0]) else Path(outside[0]).name
        raise UserError(
            f"{len(outside)} row(s) of the {kind} name files outside its folder (first: {first}); move them beside "
            f"it, or pass {ALLOW_FLAG} if they are meant to be read from there"
        )


def _within(path: str, base: Path | str) -> bool:
    if isinstance(base, str) or storage.is_url(path):  # an object store: objects under the table's prefix
        return storage.is_url(path) and isinstance(base, str) and path.startswith(base.rstrip("/") + "/")
    return inside(path, base)


def load_manifest_table(path: Path | str) -> pd.DataFrame:
    """Read a CSV or Parquet manifest (a file, or an object by URL), turning parse errors into a UserError."""
    shown = storage.redact(str(path))
    try:
        source: Path | io.BytesIO = io.BytesIO(storage.read_object(str(path))) if storage.is_url(path) else Path(path)
        if str(path).lower().endswith(".csv"):
            return pd.read_csv(source, dtype=str, keep_default_na=False)
        return pd.read_parquet(source)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise UserError(f"cannot read manifest {shown}: {exc}") from None


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or str(value).strip() == ""


def _parse_split(value: object, manifest: Path | str, index: int) -> str | None:
    if _blank(value):
        return None
    split = SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise UserError(f"manifest {manifest} row {index + 2}: split {value!r} is not one of {', '.join(SPLITS)}")
    return split


def _folder_of(manifest: Path | str) -> Path | str:
    """The folder a manifest's relative paths start from: its own."""
    return storage.parent(str(manifest)) if storage.is_url(manifest) else Path(manifest).parent


def _resolve(base: Path | str, path: str) -> str:
    """A manifest's path as the pipeline names it: an object URL, or an absolute local path."""
    path = storage.local_path(path)
    if storage.is_url(path):
        return path
    if isinstance(base, str):  # a manifest in a bucket: its relative paths are keys beside it
        if Path(path).is_absolute():
            return path
        return storage.join(base, str(PurePosixPath(path)))
    candidate = Path(path).expanduser()
    return str((candidate if candidate.is_absolute() else base / candidate).absolute())


def _row(
    path: str,
    label: str,
    split: str | None,
    group: str | None,
    reviewed: bool = False,
    stat: tuple[int, int] | None = None,
) -> dict[str, object]:
    """One listed file; `stat` is its (size, mtime_ns) where the walk read them already."""
    size, mtime = stat or (-1, -1)  # missing (the decoder reports it as a reject), or an object (_with_object_stats)
    if stat is None and not storage.is_url(path):
        try:
            found = os.stat(path)
            size, mtime = int(found.st_size), int(found.st_mtime_ns)
        except OSError:
            pass
    return {
        "path": path,
        "label": label,
        "split": split,
        "group": group,
        "size_bytes": size,
        "mtime_ns": mtime,
        "version": "",
        "reviewed": reviewed,
    }


def _with_object_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill size, time and version of the rows that name objects, from one streamed listing per bucket."""
    urls = [p for p in frame["path"] if storage.is_url(p)]
    if not urls:
        return frame
    found = object_stats(urls)
    frame = frame.copy()
    for column, field in (("size_bytes", "size"), ("mtime_ns", "mtime_ns"), ("version", "version")):
        missing = "" if column == "version" else -1
        frame[column] = [
            getattr(found[p], field) if p in found else (value if not storage.is_url(p) else missing)
            for p, value in zip(frame["path"], frame[column])
        ]
    return frame


def object_stats(urls: Iterable[str]) -> dict[str, storage.ObjectInfo]:
    """Size, time and version of each object named (absent where there is none), listing the narrowest prefix of
    each bucket that holds them all, rather than asking for each object."""
    wanted: dict[str, list[str]] = {}
    for url in set(urls):
        bucket = "/".join(url.split("/")[:3])  # s3://bucket
        wanted.setdefault(bucket, []).append(url)
    found: dict[str, storage.ObjectInfo] = {}
    for bucket, members in wanted.items():
        folders = [m[len(bucket) + 1 :].rsplit("/", 1)[0] if "/" in m[len(bucket) + 1 :] else "" for m in members]
        common = os.path.commonpath(folders) if all(folders) else ""
        names = set(members)
        for info in storage.iter_objects(storage.join(bucket, common) if common else bucket):
            if info.url in names:
                found[info.url] = info
    return found


def _frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=SOURCE_COLUMNS)
    return frame.astype({"size_bytes": "int64", "mtime_ns": "int64", "version": str, "reviewed": bool})

"""What a scoring run reads: a folder (recursive), a glob, or a CSV/Parquet manifest with `path` and id columns to
carry to the output; each may be an object store URL, and objects carry their version (`source_version`), which
tells an unchanged object without reading it again. `content_ids` hashes what is listed."""

from __future__ import annotations

import glob
import re
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from cnn.errors import UserError
from cnn.fsio import sha256_file
from cnn.io import storage
from cnn.io.decode import DecodeError, open_regular_file
from cnn.io.pool import sample_size
from cnn.io.sources import MANIFEST_SUFFIXES, iter_files, load_manifest_table, object_stats, visible_objects

VERSION_COLUMN = "source_version"  # an object's version id or ETag when it was listed ("" for a local file)
_ID_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class ScoringInputs:
    """The files to score, one row each, with the id columns carried to the output."""

    files: pd.DataFrame  # columns: path, *id_columns
    id_columns: list[str]


def list_inputs(source: str, reserved: Collection[str] = ()) -> ScoringInputs:
    """A folder (recursive), a glob, or a CSV/Parquet manifest with `path` and any id columns; each may be an object
    store URL (`s3://bucket/incoming/`, `s3://bucket/incoming/**/*.jpg`, `s3://bucket/batch.csv`), and a manifest
    may name objects. Objects carry their version (`source_version`), which tells an unchanged object without
    reading it again. A manifest's id columns must not be named like the `reserved` ones (or `prob_*`): the columns the
    output has already."""
    source = storage.local_path(source)
    reserved = {*reserved, VERSION_COLUMN}
    inputs = _list_objects(source, reserved) if storage.is_url(source) else _list_local(source, reserved)
    if inputs.files["path"].map(storage.is_url).any():
        inputs = _with_versions(inputs)
    return inputs


def _list_objects(source: str, reserved: set[str]) -> ScoringInputs:
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return _list_manifest(source, reserved)
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


def _list_manifest(path: Path | str, reserved: set[str]) -> ScoringInputs:
    """A CSV/Parquet manifest (a file or an object) with `path` and any id columns to carry to the output; its
    relative paths start from its own folder."""
    shown = storage.redact(str(path))
    table = load_manifest_table(path)
    if "path" not in table.columns:
        raise UserError(f"manifest {shown} has no `path` column; it has: {', '.join(map(str, table.columns))}")
    ids = [str(c) for c in table.columns if c != "path"]
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


def _list_local(source: str, reserved: set[str]) -> ScoringInputs:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return _list_manifest(path, reserved)
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

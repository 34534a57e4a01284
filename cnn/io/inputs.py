"""What a scoring run reads: a folder (recursive), a glob, or a CSV/Parquet manifest with `path` and id columns to
carry to the output; each may be an object store URL, and objects carry their version (`source_version`), which
tells an unchanged object without reading it again. `content_ids` hashes what is listed."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from cnn.errors import UserError
from cnn.io import storage
from cnn.io.decode import DecodeError, read_regular_file
from cnn.io.pool import sample_size
from cnn.io.sources import MANIFEST_SUFFIXES, load_manifest_table, object_stats, refuse_outside, visible_objects
from cnn.io.walk import matches, split_glob, split_object_glob, walk_files
from cnn.limits import DEFAULT_MAX_FILE_BYTES

VERSION_COLUMN = "source_version"  # an object's version id or ETag when listed; a local file's stat_version
_ID_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class ScoringInputs:
    """The files to score, one row each, with the id columns carried to the output."""

    files: pd.DataFrame  # columns: path, *id_columns
    id_columns: list[str]
    outside: int = 0  # links leaving the source that were not read (cnn.io.walk)


def list_inputs(source: str, reserved: Collection[str] = (), allow_outside: bool = False) -> ScoringInputs:
    """A folder (recursive), a glob, or a CSV/Parquet manifest with `path` and any id columns; each may be an object
    store URL (`s3://bucket/incoming/`, `s3://bucket/incoming/**/*.jpg`, `s3://bucket/batch.csv`), and a manifest
    may name objects. Objects carry their version (`source_version`), which tells an unchanged object without
    reading it again. A manifest's id columns must not be named like the `reserved` ones (or `prob_*`): the columns the
    output has already. Links leaving a folder or glob, and manifest rows outside the manifest's folder, are not
    read unless `allow_outside` (cnn.io.walk)."""
    source = storage.local_path(source)
    storage.refuse_credentials(source)
    reserved = {*reserved, VERSION_COLUMN}
    if storage.is_url(source):
        inputs = _list_objects(source, reserved, allow_outside)
    else:
        inputs = _list_local(source, reserved, allow_outside)
    if inputs.files["path"].map(storage.is_url).any():
        inputs = _with_versions(inputs)
    return inputs


def _list_objects(source: str, reserved: set[str], allow_outside: bool) -> ScoringInputs:
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return _list_manifest(source, reserved, allow_outside)
    if any(ch in source for ch in "*?["):
        prefix, pattern = split_object_glob(source)
        urls = sorted(found.url for parts, found in visible_objects(prefix) if matches(pattern, parts))
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


def _list_manifest(path: Path | str, reserved: set[str], allow_outside: bool) -> ScoringInputs:
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
    refuse_outside(files["path"], base if storage.is_url(path) else Path(base), "manifest", allow_outside)
    files[ids] = files[ids].astype(str)
    return ScoringInputs(files.drop_duplicates("path", ignore_index=True)[["path", *ids]], ids)


def _beside(base: str, path: str) -> str:
    """A manifest's path: a URL or an absolute path as it is, a relative one under the manifest's folder."""
    path = storage.local_path(path)
    if storage.is_url(path) or Path(path).is_absolute():
        return path
    return storage.join(base, path) if storage.is_url(base) else str(Path(base) / path)


def _list_local(source: str, reserved: set[str], allow_outside: bool) -> ScoringInputs:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return _list_manifest(path, reserved, allow_outside)
    if path.is_dir():
        root, found = path, walk_files(path, allow_outside=allow_outside)
    elif any(ch in source for ch in "*?["):
        root, pattern = split_glob(source)
        if not root.is_dir():
            raise UserError(f"nothing to score: {root} (the folder of the glob) is not a folder")
        found = walk_files(root, pattern, allow_outside=allow_outside)
    else:
        raise UserError(f"nothing to score: {source} is not a folder, a glob or a CSV/Parquet manifest")
    found.warn(root)
    files = pd.DataFrame({"path": [str(p) for p in found.files]}, dtype=object)
    return ScoringInputs(files.drop_duplicates("path", ignore_index=True), [], len(found.outside))


def stat_version(path: str) -> str:
    """A local file's version, as an object's ETag is one: `stat:size:mtime_ns:ctime_ns:inode` ("" when it is not a
    regular file one can stat). Writing, truncating, replacing or renaming a file over it changes the inode or the
    ctime (which no user can set), so an unchanged stat means unchanged bytes on a filesystem that keeps them."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if not stat.S_ISREG(st.st_mode):
        return ""
    return f"stat:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def with_stat_versions(files: pd.DataFrame) -> pd.DataFrame:
    """`files` with VERSION_COLUMN filled for local paths by `stat_version` (objects keep theirs): one stat per file,
    so planning knows an unchanged file without reading it."""
    paths = files["path"].astype(str)
    given = files[VERSION_COLUMN].astype(str) if VERSION_COLUMN in files.columns else pd.Series("", index=files.index)
    local = ~paths.map(storage.is_url)
    versions = given.where(~local, [stat_version(p) if is_local else "" for p, is_local in zip(paths, local)])
    return files.assign(**{VERSION_COLUMN: versions.to_numpy(dtype=object)})


def content_ids(paths: Sequence[str], threads: int = 4, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[str]:
    """The sha256 of each file's bytes (the `image_id`); "" for a file that cannot be read as a regular file. Objects
    (URLs) are read several at a time. At most `max_file_bytes + 1` bytes of any input are read: a larger file's id
    is the hash of what was read, which no file within the limit can share (the decoder rejects it as too large)."""
    urls = [i for i, p in enumerate(paths) if storage.is_url(p)]
    if urls:
        found = dict(zip(urls, storage.sha256_objects([paths[i] for i in urls], max_bytes=max_file_bytes)))
        rest = [i for i in range(len(paths)) if i not in found]
        local = dict(zip(rest, content_ids([paths[i] for i in rest], threads, max_file_bytes))) if rest else {}
        return [found[i] if i in found else local[i] for i in range(len(paths))]

    def digest(path: str) -> str:
        try:
            return hashlib.sha256(read_regular_file(path, max_file_bytes + 1)).hexdigest()
        except (DecodeError, OSError):
            return ""  # unreadable or not a regular file: the decoder reports why

    def digests(chunk: Sequence[str]) -> list[str]:
        return [digest(path) for path in chunk]

    if sample_size(paths) < 256 * 1024:  # small files: the Python around each read outweighs what threads win
        return digests(paths)
    with ThreadPoolExecutor(threads) as pool:  # hashlib and large reads release the GIL
        return list(pool.map(digest, paths))

"""Walking a local source, bounded: every folder is entered once (a link back to a folder already visited, `a -> .`,
is not followed again), links that leave the source are not read unless allowed, the number of entries has a ceiling,
and a stop request (SIGTERM) is honoured between folders. A glob is matched on the walk, so it obeys the same rules.
Paths a user or a table names (manifest rows, review tables) are checked with `cnn.fsio.inside`."""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cnn import stopping
from cnn.errors import UserError
from cnn.fsio import inside
from cnn.limits import MAX_SOURCE_ENTRIES

ALLOW_FLAG = "--allow-outside"  # the option that lets links, manifests and review tables reach outside their folder
_log = logging.getLogger(__name__)


@dataclass
class Walk:
    """What a walk found: the files (absolute where the folder is) with the size and modification time the walk read
    (-1 where the file vanished meanwhile), and the links it did not read because they leave the source."""

    files: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)  # st_mtime_ns
    outside: list[str] = field(default_factory=list)  # links leaving the source, relative to it

    def warn(self, root: Path) -> None:
        if self.outside:
            _log.warning(
                "%d link(s) under %s lead outside it and were not read (first: %s); pass %s to read them",
                len(self.outside),
                root.name,
                self.outside[0],
                ALLOW_FLAG,
            )


def walk_files(
    folder: Path,
    pattern: str | None = None,
    *,
    root: Path | None = None,
    allow_outside: bool = False,
    max_entries: int = MAX_SOURCE_ENTRIES,
) -> Walk:
    """The non-hidden files below `folder` (matching `pattern`, a glob relative to it, `**` for any depth), sorted.
    `root` is the source the walk belongs to (default `folder`): links resolving outside it are left out (listed in
    `Walk.outside`) unless `allow_outside`. One `os.scandir` per folder and one stat per file (a link is told from
    the directory entry, without a call), so a folder of a million thumbnails lists in seconds."""
    root = Path(root or folder)
    parts = pattern.split("/") if pattern else None
    found: list[tuple[str, int, int]] = []
    walk = Walk()
    if not allow_outside and not inside(folder, root):  # a linked class folder that leads elsewhere
        walk.outside.append(str(folder.relative_to(root)))
        return walk
    seen: set[tuple[int, int]] = set()
    pending, entries, base = [str(folder)], 0, len(os.path.join(str(folder), ""))
    while pending:
        here = pending.pop()
        stopping.check()  # a safe point between folders: SIGTERM ends a long listing within a folder's time
        try:
            st = os.stat(here)
            if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked: never twice
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(here) as listing:
                children = sorted(listing, key=lambda e: e.name)
        except OSError:  # a folder that vanished or cannot be read: what os.walk skipped too
            continue
        entries += len(children)
        if entries > max_entries:
            raise UserError(
                f"{folder.name} holds more than {max_entries:,} files and folders; score or ingest it in parts "
                "(a manifest, or subfolders)"
            )
        folders = []
        for entry in children:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if entry.is_symlink() and not allow_outside and not inside(entry.path, root):
                walk.outside.append(os.path.relpath(entry.path, root))
                continue
            if is_dir:
                folders.append(entry.path)
                continue
            if parts is not None and not matches(parts, tuple(entry.path[base:].split(os.sep))):
                continue
            try:
                stat = entry.stat()
                found.append((entry.path, int(stat.st_size), int(stat.st_mtime_ns)))
            except OSError:  # vanished, or a dangling link: listed, and the decoder says what is wrong with it
                found.append((entry.path, -1, -1))
        pending.extend(reversed(folders))
    found.sort(key=lambda row: row[0].split(os.sep))  # by folder, then name: the order pathlib sorts in
    for path, size, mtime in found:
        walk.files.append(path)
        walk.sizes.append(size)
        walk.mtimes.append(mtime)
    return walk


def matches(pattern: list[str], parts: tuple[str, ...]) -> bool:
    """Whether path `parts` match glob `pattern` parts (`**`: any number of folders, as in glob's recursive mode)."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(matches(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and matches(rest, parts[1:])


def split_object_glob(pattern: str) -> tuple[str, list[str]]:
    """An object store glob (`s3://bucket/photos/**/*.jpg`) as (the prefix before its first wildcard, the pattern's
    parts below it), matched on a streamed, bounded listing of that prefix like a local glob on a walk."""
    scheme, _, rest = pattern.partition("://")
    parts = rest.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(ch in p for ch in "*?[")), len(parts))
    if fixed < 1:
        raise UserError(f"{scheme}://{parts[0]}: a glob needs a bucket or container name without wildcards")
    return f"{scheme}://{'/'.join(parts[:fixed])}", parts[fixed:]


def split_glob(pattern: str) -> tuple[Path, str]:
    """A local glob as (the folder before its first wildcard, the pattern relative to it)."""
    parts = Path(pattern).expanduser().parts
    fixed = next((i for i, p in enumerate(parts) if any(ch in p for ch in "*?[")), len(parts))
    return Path(*parts[:fixed]) if fixed else Path("."), "/".join(parts[fixed:])

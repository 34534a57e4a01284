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
    """What a walk found: the files, and the links it did not read because they leave the source."""

    files: list[Path] = field(default_factory=list)
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
    `Walk.outside`) unless `allow_outside`."""
    root = Path(root or folder)
    parts = pattern.split("/") if pattern else None
    found, seen, entries = Walk(), set(), 0
    if not allow_outside and not inside(folder, root):  # a linked class folder that leads elsewhere
        found.outside.append(str(folder.relative_to(root)))
        return found
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        stopping.check()  # a safe point between folders: SIGTERM ends a long listing within a folder's time
        here = Path(dirpath)
        st = os.stat(here)
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked: never twice
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        entries += len(dirnames) + len(filenames)
        if entries > max_entries:
            raise UserError(
                f"{folder.name} holds more than {max_entries:,} files and folders; score or ingest it in parts "
                "(a manifest, or subfolders)"
            )
        kept = []
        for name in sorted(dirnames):
            child = here / name
            if name.startswith("."):
                continue
            if child.is_symlink() and not allow_outside and not inside(child, root):
                found.outside.append(str(child.relative_to(root)))
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or (parts is not None and not matches(parts, path.relative_to(folder).parts)):
                continue
            if path.is_symlink() and not allow_outside and not inside(path, root):
                found.outside.append(str(path.relative_to(root)))
                continue
            found.files.append(path)
    found.files.sort()
    return found


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

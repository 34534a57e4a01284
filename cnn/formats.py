"""Records we write and read back (dataset.json, contract.json, fit.json, drift.json) carry a `format_version`:
a reader brings an older record up to the current format one migration at a time, and refuses a newer one with a
message instead of misreading it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cnn.errors import UserError

Migration = Callable[[dict[str, Any]], dict[str, Any]]


def migrated(data: Mapping[str, Any], current: int, steps: Mapping[int, Migration], what: str) -> dict[str, Any]:
    """`data` at format `current`: `steps[n]` turns format n into n + 1 (a record without `format_version` is
    format 1). A record from a newer version of cnn is a UserError naming it."""
    record = dict(data)
    version = record.get("format_version", 1)
    if not isinstance(version, int) or version < 1 or (version < current and version not in steps):
        raise UserError(f"{what} has format_version {version!r}, which no version of cnn wrote")
    if version > current:
        raise UserError(
            f"{what} was written by a newer version of cnn (format {version}; this one reads up to {current}): "
            "upgrade cnn to read it"
        )
    while version < current:
        record = steps[version](record)
        version += 1
    record["format_version"] = current
    return record

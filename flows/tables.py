"""Upkeep of the Delta prediction tables: compact the night's small files, then remove what no version needs (the
weekly `tables/maintain` deployment; `cnn tables optimize|vacuum` run the same steps by hand)."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from cnn.batch import table_tools
from cnn.batch.table_tools import Maintained
from cnn.limits import VACUUM_RETAIN_HOURS
from flows import workspace


@task(name="optimize-tables", cache_policy=NO_CACHE)
def optimize(root: str) -> list[Maintained]:
    """Compact each table's per-shard files and write a checkpoint."""
    return table_tools.optimize(root)


@task(name="vacuum-tables", cache_policy=NO_CACHE)
def vacuum(root: str, retain_hours: int) -> list[Maintained]:
    """Delete the files no version younger than `retain_hours` needs."""
    return table_tools.vacuum(root, retain_hours)


@flow(name="tables")
def tables_flow(root: str, retain_hours: int = VACUUM_RETAIN_HOURS, home: str | None = None) -> list[Maintained]:
    """Compact, then vacuum, the Delta prediction tables under ROOT (a folder or an object-store prefix)."""
    workspace.configure(home)
    compacted = optimize(root)
    vacuumed = vacuum(root, retain_hours)
    rows = [
        {"table": c.table, "files before": c.files_before, "files after": c.files_after, "deleted": v.removed}
        for c, v in zip(compacted, vacuumed)
    ]
    create_table_artifact(rows, key="tables-maintained", description="Files per table, before and after")
    return compacted + vacuumed

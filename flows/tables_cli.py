"""`cnn tables`: the Delta prediction tables' upkeep (optimize, vacuum), a plain-file export and the one-off
migration of tables written by earlier versions."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from cnn.choices import DELTA_EXPORTS
from cnn.errors import UserError
from cnn.io import storage
from cnn.limits import VACUUM_RETAIN_HOURS
from flows.boundary import command

if TYPE_CHECKING:
    from cnn.batch.table_tools import Maintained

tables_app = typer.Typer(
    help="Upkeep of Delta prediction tables (a folder or prefix that `cnn score --output` wrote).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
console = Console(soft_wrap=True)
ROOT = Annotated[str, typer.Argument(help="The tables' folder or object-store prefix (what --output named).")]


def _show(title: str, done: list[Maintained]) -> None:
    table = Table(title=title)
    for column in ("table", "files before", "files after", "deleted"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for row in done:
        table.add_row(row.table, str(row.files_before), str(row.files_after), str(row.removed))
    console.print(table)


def _as_of(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--as-of {text!r} is not an ISO time (2026-12-01 or 2026-12-01T02:30:00+00:00)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@tables_app.command("optimize")
@command
def optimize(root: ROOT) -> None:
    """Compact the per-shard files of every table into large ones and write a checkpoint."""
    # imported here: pandas and delta-rs load only for this command, not at every `cnn` start
    from cnn.batch import table_tools

    _show(f"optimized {storage.redact(root)}", table_tools.optimize(root))


@tables_app.command("vacuum")
@command
def vacuum(
    root: ROOT,
    retain_hours: Annotated[
        int, typer.Option(help="Keep what versions this young need (time travel reaches this far back).")
    ] = VACUUM_RETAIN_HOURS,
) -> None:
    """Delete the files no recent version needs (replaced by optimize, or left by a killed writer)."""
    # imported here: as above
    from cnn.batch import table_tools

    _show(f"vacuumed {storage.redact(root)}", table_tools.vacuum(root, retain_hours))


@tables_app.command("export")
@command
def export(
    root: ROOT,
    out: Annotated[Path, typer.Argument(help="A .parquet or .csv file to write.")],
    as_of: Annotated[str | None, typer.Option(help="The rows as they were at this time (ISO; UTC if no zone).")] = None,
    history: Annotated[
        bool, typer.Option(help="Every row ever written (superseded_at set), not only the current.")
    ] = False,
    table: Annotated[
        str,
        typer.Option(help=f"Which table or view: {', '.join(DELTA_EXPORTS)} (review: the queue a reviewer fills in)."),
    ] = "predictions",
) -> None:
    """Write the current rows of a table (as of a time) as one plain file a spreadsheet or pandas opens."""
    # imported here: as above
    from cnn.batch import table_tools

    rows = table_tools.export(root, out, _as_of(as_of), history, table)
    console.print(f"wrote {rows} rows to {out}")


@tables_app.command("migrate")
@command
def migrate(
    old: Annotated[str, typer.Argument(help="An earlier version's table: X.parquet|csv or a partitioned folder.")],
    root: ROOT,
) -> None:
    """Convert a table written by an earlier version into Delta tables at ROOT (once: a second run writes nothing)."""
    # imported here: as above
    from cnn.batch import table_tools

    written = table_tools.migrate(old, root)
    console.print(", ".join(f"{kind}: {rows} rows" for kind, rows in written.items()) + f" -> {storage.redact(root)}")

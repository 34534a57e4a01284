"""Where a scoring run writes: the sinks named by --output and --table (a file, an object-store table, a
partitioned table, a SQL table), all behind one protocol (`Sink`, in cnn.batch.file_sink)."""

from __future__ import annotations

from pathlib import Path

from cnn.batch.file_sink import FileSink, Sink
from cnn.batch.object_sink import ObjectSink, PartitionedSink
from cnn.batch.sql_sink import SqlSink
from cnn.errors import UserError
from cnn.io.storage import is_url, local_path

__all__ = ["Sink", "open_sink"]


def open_sink(
    output: str | None, table: str | None, default_table: str, partition_by: list[str] | None = None
) -> list[Sink]:
    """The sinks named by --output and --table; the default SQL table when neither is given. An --output URL
    (`s3://bucket/preds/night.parquet`) is a table in an object store, and `partition_by` makes --output a
    partitioned Parquet table (cnn/batch/object_sink.py)."""
    sinks: list[Sink] = []
    if partition_by and not output:
        raise UserError("--partition-by needs an --output folder or prefix to write the partitioned table to")
    if output and partition_by:
        target = local_path(output)
        sinks.append(
            PartitionedSink(target if is_url(target) else str(Path(target).expanduser().resolve()), partition_by)
        )
    elif output and is_url(local_path(output)):
        sinks.append(ObjectSink(local_path(output)))
    elif output:
        sinks.append(FileSink(Path(local_path(output))))
    if table or not output:
        sinks.append(SqlSink.from_url(table or default_table))
    return sinks

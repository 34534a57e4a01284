"""Where a scoring run writes: the sinks named by --output and --table, all behind one protocol (`Sink`, in
cnn.batch.file_sink):

  --output night.parquet | night.csv      a plain file a person opens (cnn/batch/file_sink.py), local only
  --output FOLDER | s3://bucket/prefix    Delta Lake tables (cnn/batch/delta_sink.py), on disk or in a store
  --table sqlite:///... | postgresql://   SQL tables (cnn/batch/sql_sink.py); the default when no --output
"""

from __future__ import annotations

from pathlib import Path

from cnn.batch.delta_sink import DeltaSink
from cnn.batch.file_sink import FileSink, Sink
from cnn.batch.sql_sink import SqlSink
from cnn.errors import UserError
from cnn.io.storage import is_url, local_path, redact

__all__ = ["Sink", "open_sink", "output_sink"]

PLAIN_FILES = (".parquet", ".csv")
# names that say "a file" but are neither: a mistake, not a folder of Delta tables to create
FILE_LIKE = (".txt", ".json", ".jsonl", ".tsv", ".xls", ".xlsx", ".db", ".sqlite", ".feather", ".arrow", ".pq")


def output_sink(output: str, partition_by: list[str] | None = None) -> FileSink | DeltaSink:
    """The sink --output names: a local .parquet/.csv file, else a folder or prefix of Delta tables."""
    target = local_path(output)
    plain = target.lower().endswith(PLAIN_FILES)
    if plain and is_url(target):
        raise UserError(
            f"{redact(target)}: an object store keeps the tables as Delta tables; name a prefix without "
            f"{target.rsplit('.', 1)[-1]} (e.g. {redact(target.rsplit('/', 1)[0])}/predictions), and "
            "`cnn tables migrate` converts tables written by earlier versions"
        )
    if plain and partition_by:
        raise UserError("--partition-by writes Delta tables: name a folder or prefix for --output, not a file")
    if plain:
        return FileSink(Path(target))
    name = target.rstrip("/").rsplit("/", 1)[-1]
    if name.lower().endswith(FILE_LIKE) or (not is_url(target) and Path(target).expanduser().is_file()):
        raise UserError(
            f"--output {name}: name a .parquet or .csv file, or a folder (or object-store prefix) for Delta tables"
        )
    return DeltaSink(target if is_url(target) else str(Path(target).expanduser().resolve()), partition_by or ())


def open_sink(
    output: str | None, table: str | None, default_table: str, partition_by: list[str] | None = None
) -> list[Sink]:
    """The sinks named by --output and --table; the default SQL table when neither is given."""
    if partition_by and not output:
        raise UserError("--partition-by needs an --output folder or prefix to write the tables to")
    sinks: list[Sink] = []
    if output:
        sinks.append(output_sink(output, partition_by))
    if table or not output:
        sinks.append(SqlSink.from_url(table or default_table))
    return sinks

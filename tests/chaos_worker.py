"""The process the chaos test kills with SIGKILL at random moments: one ingest, or one scoring run of a folder into
every sink given (a .parquet file, a folder of Delta tables, a SQL URL), through the library calls the flows wrap
(`python -m tests.chaos_worker ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

from cnn.batch.file_sink import Sink
from cnn.batch.plan import list_inputs, plan_shards
from cnn.batch.run import ModelRef, ScoringOptions
from cnn.batch.shard import Scorer
from cnn.batch.sinks import output_sink
from cnn.batch.sql_sink import SqlSink
from cnn.config import IngestOptions
from cnn.data.ingest import ingest
from cnn.infer.predictor import Predictor

MODEL = ModelRef("patterns", "1", "run-1")


def score(source: str, weights: str, contract: str, run_dir: str, outputs: list[str]) -> None:
    sinks: list[Sink] = [SqlSink.from_url(o) if "://" in o else output_sink(o) for o in outputs]
    predictor = Predictor.load(Path(weights), Path(contract), "cpu")
    plan = plan_shards(list_inputs(source), sinks, MODEL, shard_size=6, run_dir=Path(run_dir))
    print("planned", flush=True)  # the chaos test kills from here on: where the writing happens
    scorer = Scorer(predictor, MODEL, ScoringOptions(decode_workers=1))
    for shard in range(plan.shards):
        scorer.score_shard(plan, shard, sinks)
    for sink in sinks:
        sink.finish()
    plan.remove()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "ingest":
        ingest(args[0], Path(args[1]), IngestOptions(image_size=24, channels=1, decode_workers=1))
    else:
        score(args[0], args[1], args[2], args[3], args[4:])

"""Prefect flow `pipeline`: ingest -> train (register, gate) -> score, as one scheduled run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from cnn.config import TrainConfig
from cnn.ingest import IngestOptions
from flows.ingest import ingest_flow
from flows.score import score_flow
from flows.train import train_flow


@flow(name="pipeline")
def pipeline_flow(source: str, dataset: str, incoming: str, options: IngestOptions | None = None,
                  config: TrainConfig | None = None, output: str | None = None, table: str | None = None,
                  review_below: float = 0.0) -> dict[str, Any]:
    """Refresh DATASET from SOURCE, train and gate a model, then score INCOMING with the champion."""
    ingested = ingest_flow(source=source, dataset=dataset, options=options)
    trained = train_flow(dataset=dataset, config=config)
    model = trained["gate"]["model"]
    scored = score_flow(source=incoming, model=f"{model}@champion", output=output, table=table,
                        review_below=review_below)
    return {"ingest": ingested, "train": trained, "score": scored}

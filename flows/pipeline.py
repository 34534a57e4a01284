"""Prefect flow `pipeline`: ingest -> train (register, gate) -> score, as one scheduled run."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from cnn.batch.run import ScoringSummary
from cnn.config import IngestOptions, ScoreConfig, TrainConfig
from flows.ingest import IngestOutcome, ingest_flow
from flows.score import score_flow
from flows.train import TrainOutcome, train_flow


@dataclass(frozen=True)
class PipelineOutcome:
    """The three stages' results."""

    ingest: IngestOutcome
    train: TrainOutcome
    score: ScoringSummary


@flow(name="pipeline")
def pipeline_flow(
    source: str,
    dataset: str,
    incoming: str,
    options: IngestOptions | None = None,
    config: TrainConfig | None = None,
    scoring: ScoreConfig | None = None,
    reviews: str | None = None,
) -> PipelineOutcome:
    """Refresh DATASET from SOURCE, take reviewers' answers from Label Studio for the prediction table REVIEWS
    (where given), train and gate a model, then score INCOMING with its champion (the scoring config's model is
    replaced by the model just trained)."""
    ingested = ingest_flow(source=source, dataset=dataset, options=options)
    trained = train_flow(dataset=dataset, config=config, reviews=reviews)
    champion = f"{trained.gate.model}@champion"
    score_config = scoring.model_copy(update={"model": champion}) if scoring else ScoreConfig(model=champion)
    scored = score_flow(source=incoming, config=score_config)
    return PipelineOutcome(ingested, trained, scored)

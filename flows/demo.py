"""`cnn demo`: the main job on generated data. The pipeline flow does the work (ingest -> train -> register ->
score a fresh batch); this module only makes the data and names the outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnn.batch.run import ScoringSummary
from cnn.batch.tables import side_table
from cnn.config import IngestOptions, ScoreConfig, TrainConfig
from cnn.data.demo import DemoDataset, generate
from flows.explain import ExplainOutcome, card, explain
from flows.pipeline import PipelineOutcome, pipeline_flow
from flows.score import score_flow

# The demo's recipe: 1,200 generated X-rays at 64 px grayscale, small_cnn (the rule's choice for 850 training images)
# with a one-minute budget that plans its epochs, no augmentation (at one minute it only slows learning:
# docs/train.md); a nodule operating point that keeps sensitivity at 0.9 (chosen on validation), and the model
# card's use and limits.
DEMO_IMAGES = 1200
DEMO_INGEST = IngestOptions(image_size=64, channels=1)
DEMO_TRAIN = TrainConfig(
    model="small_cnn",
    max_minutes=1.0,
    epochs=200,
    policy="none",
    operating_points=["nodule:sensitivity>=0.9"],
    intended_use="Demonstration on generated chest-x-ray-like images: triage which studies a reader sees first.",
    limitations="Trained on synthetic shapes, not on real radiographs; never use it for a clinical decision.",
)


@dataclass(frozen=True)
class DemoOutcome:
    """What the demo made and where the prediction tables are."""

    data: DemoDataset
    pipeline: PipelineOutcome
    csv_run: ScoringSummary
    parquet: Path
    csv: Path
    table: str


def make_data(home: Path) -> tuple[DemoDataset, DemoDataset]:
    """The xray training set and a fresh batch of 60 images (plus a duplicate and broken files) to score."""
    training = generate("xray", home / "demo" / "xray", n=DEMO_IMAGES)
    return training, generate("xray", home / "incoming" / "xray-batch", n=60, seed=1)


def run_demo(home: Path, data: DemoDataset, batch: DemoDataset) -> DemoOutcome:
    """The pipeline flow into Parquet + SQLite, then the same batch into CSV (SQL rows upserted, never doubled)."""
    table = f"sqlite:///{home / 'predictions.db'}#predictions"
    parquet, csv = home / "predictions" / "xray.parquet", home / "predictions" / "xray.csv"
    scoring = ScoreConfig(model="xray", output=str(parquet), table=table)
    outcome = pipeline_flow(
        source=str(data.source),
        dataset="xray",
        incoming=str(batch.root / "images"),
        options=DEMO_INGEST,
        config=DEMO_TRAIN,
        scoring=scoring,
    )
    csv_run = score_flow(
        source=str(batch.root / "images"),
        config=scoring.model_copy(update={"model": f"{outcome.train.gate.model}@champion", "output": str(csv)}),
    )
    return DemoOutcome(data, outcome, csv_run, parquet, csv, table)


@dataclass(frozen=True)
class Inside:
    """What the demo shows of the trained version: its review queue, explanations of its top rows, its card."""

    review: Path
    explained: ExplainOutcome
    card: str


def look_inside(home: Path, outcome: DemoOutcome, rows: int = 2) -> Inside:
    """Explain the most urgent rows of the review queue and read the champion's model card."""
    import pandas as pd

    review = Path(side_table(str(outcome.parquet), "review"))
    urgent = pd.read_parquet(review)["path"].head(rows).tolist()
    model = f"{outcome.pipeline.train.gate.model}@champion"
    return Inside(review, explain(urgent, model, home / "explained"), card(model))

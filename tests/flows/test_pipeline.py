"""The pipeline flow (what `cnn demo` and the weekly deployment run): ingest -> train and gate -> score with the
champion it just crowned, passing typed outcomes from stage to stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cnn.config import IngestOptions, ScoreConfig, TrainConfig
from tests.helpers import TINY, write_patterns

pytestmark = pytest.mark.slow


def test_pipeline_scores_with_the_champion_it_trained(prefect_server: None, cnn_home: Path, tmp_path: Path) -> None:
    from flows import workspace
    from flows.pipeline import pipeline_flow

    workspace.configure()
    source = write_patterns(tmp_path / "src", per_class=12)
    incoming = write_patterns(tmp_path / "incoming", per_class=2, seed=4)
    out = tmp_path / "preds.parquet"
    outcome = pipeline_flow(
        source=str(source),
        dataset="patterns",
        incoming=str(incoming),
        options=IngestOptions(image_size=24, channels=1, decode_workers=1),
        config=TrainConfig(**{**TINY, "epochs": 2, "batch_size": 16}),
        scoring=ScoreConfig(model="not-this-one", output=str(out), review_below=0.0),
    )
    assert Path(outcome.ingest.manifest).is_file()
    assert outcome.train.gate.decision == "champion" and outcome.train.gate.version == "1"
    assert outcome.score.model == "patterns v1" and outcome.score.predicted == 6 and outcome.score.rejected == 0
    preds = pd.read_parquet(out)
    assert set(preds["model_name"]) == {"patterns"} and not preds["needs_review"].any()

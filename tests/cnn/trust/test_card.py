"""Model cards: typed sections, written as Markdown and JSON, read back from card.json as the same card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cnn.data.dataset import Dataset
from cnn.model.run import FitResult
from cnn.trust.card import GateSummary, ModelCard, build_card
from cnn.trust.evaluation import calibrate_run, evaluate_run


def test_a_model_card_round_trips_through_its_json_with_typed_sections(
    trained: FitResult, patterns: Path, tmp_path: Path
) -> None:
    """card.json is written from typed sections and read back into the same card (what `to_markdown` renders)."""
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)  # the session's trained run stays as it is
    calibrate_run(run, patterns)
    evaluate_run(run, patterns, "test")
    gate = GateSummary("champion", "no champion yet")
    card = build_card(run, Dataset(patterns), "patterns", "1", {"intended_use": "tests"}, gate, [])
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))  # as card.json is read back
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(card.to_dict(), sort_keys=True)
    assert again.to_markdown() == card.to_markdown()
    assert card.data.ok == len(Dataset(patterns).usable()) and set(card.per_class) == set(trained.contract.classes)
    assert "**@champion**: no champion yet" in card.to_markdown()

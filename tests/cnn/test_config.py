"""The typed configs: YAML in, options on top, unknown keys and bad values as one readable error."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnn.config import IngestOptions, ScoreConfig, SplitFractions, TrainConfig
from cnn.errors import UserError


def test_yaml_then_overrides_and_readable_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 3\nlr: 0.01\n")
    cfg = TrainConfig.load(path, lr=0.02, epochs=None)
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 0.02, None)  # None means "not given on the command line"
    path.write_text("epochs: 3\nlearning_rate: 0.01\n")
    with pytest.raises(UserError, match="invalid training config: learning_rate: Extra inputs are not permitted"):
        TrainConfig.load(path)
    with pytest.raises(UserError, match="config file not found"):
        ScoreConfig.load(tmp_path / "missing.yaml", model="m")


def test_operating_points_are_parsed_and_fractions_checked() -> None:
    cfg = TrainConfig(operating_points=[" tumour : recall >= .9"])
    assert cfg.operating_points == ["tumour:sensitivity>=0.9"] and cfg.point_specs()[0].value == 0.9
    assert IngestOptions(val_fraction=0.2, test_fraction=0.1).fractions() == SplitFractions(0.2, 0.1)
    with pytest.raises(UserError, match="must leave some data to train on"):
        IngestOptions(val_fraction=0.5, test_fraction=0.5).fractions()


def test_described_states_the_default() -> None:
    assert ScoreConfig.described("top_k") == "Ranked labels kept per image (default: 3)"
    assert ScoreConfig.described("model") == "MODEL (= MODEL@champion), MODEL@alias or MODEL:version"

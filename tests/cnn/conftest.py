"""Library fixtures: one small pattern dataset and one model trained on it, shared by the read-only tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnn.config import TrainConfig
from cnn.model.run import FitResult
from cnn.model.train import fit
from tests.helpers import TINY, pattern_dataset

FAST = dict(
    **TINY,
    batch_size=16,
    lr=3e-3,
    warmup_epochs=0.5,
    precision="fp32",  # bit-for-bit comparisons need one precision on every host (auto times bf16 per host)
)


@pytest.fixture(scope="session")
def patterns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ingested pattern dataset (24 px gray, three classes); never modified by tests."""
    return pattern_dataset(tmp_path_factory.mktemp("patterns"))


@pytest.fixture(scope="session")
def trained(patterns: Path, tmp_path_factory: pytest.TempPathFactory) -> FitResult:
    """small_cnn trained 6 epochs on `patterns`; read-only for tests."""
    return fit(TrainConfig(epochs=6, **FAST), patterns, tmp_path_factory.mktemp("trained") / "run")

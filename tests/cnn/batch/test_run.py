"""A run's options: decoding ahead only where inference leaves cores free."""

from __future__ import annotations

import pytest

from cnn.batch import run as scoring_run
from cnn.batch.run import ScoringOptions


def test_decoding_ahead_is_on_only_where_inference_leaves_cores_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """On 2 cores with 2 torch threads decoding ahead measured 0.95-1.00x: a run turns it on only with cores to
    spare or on a GPU, and never when its shards fan out to Dask (each shard on its own worker)."""
    from cnn.config import ScoreConfig

    monkeypatch.setattr(scoring_run.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(scoring_run, "default_workers", lambda: 2)
    assert not scoring_run.decode_ahead_helps("cpu") and scoring_run.decode_ahead_helps("cuda:0")
    assert not ScoringOptions.from_config(ScoreConfig(model="m", device="cpu"), "").decode_ahead
    monkeypatch.setattr(scoring_run, "default_workers", lambda: 8)
    assert ScoringOptions.from_config(ScoreConfig(model="m", device="cpu"), "").decode_ahead
    assert not ScoringOptions.from_config(ScoreConfig(model="m", device="cpu", dask_workers=2), "").decode_ahead

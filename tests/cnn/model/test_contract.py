"""The model's data contract: the decode spec and normalisation inference builds from it, saved and loaded whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnn.metrics.operating_points import OperatingPoint
from cnn.model.contract import IMAGENET_MEAN, ModelContract, to_model_input


def test_a_contract_round_trips_and_gives_the_decode_spec_of_its_ingest(tmp_path: Path) -> None:
    point = OperatingPoint("tumour", "sensitivity", 0.9, 0.3, True)
    contract = ModelContract("small_cnn", ["normal", "tumour"], 1, 64, "crop", [0.5], [0.25], max_file_bytes=1000)
    contract.operating_points = [point.to_dict()]
    loaded = ModelContract.load(contract.save(tmp_path / "contract.json"))
    assert loaded == contract and loaded.points() == [point]
    spec = loaded.decode_spec()
    assert (spec.channels, spec.size, spec.resize, spec.max_file_bytes) == (1, 64, "crop", 1000)


def test_normalisation_and_the_model_input() -> None:
    assert ModelContract.normalisation(3, pretrained=True) == (list(IMAGENET_MEAN), [0.229, 0.224, 0.225])
    assert ModelContract.normalisation(1, pretrained=False) == ([0.5], [0.25])
    batch = torch.from_numpy(np.full((2, 4, 4, 1), 255, np.uint8))
    x = to_model_input(batch, torch.tensor([0.5]), torch.tensor([0.25]), torch.device("cpu"), channels_last=False)
    assert tuple(x.shape) == (2, 1, 4, 4) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([2.0] * 32)  # (1.0 - 0.5) / 0.25


@pytest.mark.parametrize(
    "change",
    [
        {"classes": ["clear", "o/../../../../tmp/x"]},  # a class name that would become a path
        {"classes": ["clear", "clear"]},
        {"classes": ["only"]},
        {"channels": 4},
        {"image_size": 10**9},  # would size every buffer
        {"std": [0.0]},
        {"dataset": "../other"},
        {"format_version": 0},
        {"unknown_key": 1},
    ],
)
def test_a_contract_is_validated_when_it_is_loaded_not_only_at_ingest(tmp_path: Path, change: dict) -> None:
    import json
    from dataclasses import asdict

    from cnn.errors import UserError

    good = ModelContract("small_cnn", ["clear", "effusion"], 1, 28, "pad", [0.5], [0.25], dataset="xray")
    path = tmp_path / "contract.json"
    path.write_text(json.dumps({**asdict(good), **change}))
    with pytest.raises(UserError, match="contract.json"):
        ModelContract.load(path)
    path.write_text(json.dumps(asdict(good)))
    assert ModelContract.load(path) == good

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

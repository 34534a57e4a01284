"""The moving average of the weights: the first update copies, later ones average with the warmed-up decay
(1 + n) / (10 + n); saved and restored with its count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnn.model.ema import WeightAverage


def _set(model: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_the_average_follows_the_weights_with_the_warmed_up_decay() -> None:
    model = _set(nn.Linear(1, 1, bias=False), 1.0)
    average = WeightAverage(model, decay=0.999)
    average.update(model)  # the first update copies the weights
    assert average.module.weight.item() == pytest.approx(1.0)
    average.update(_set(model, 0.0))  # decay (1 + 1) / (10 + 1): mostly the new weights early in a run
    assert average.module.weight.item() == pytest.approx(2 / 11)
    restored = WeightAverage(nn.Linear(1, 1, bias=False), decay=0.999)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 2 and restored.module.weight.item() == pytest.approx(2 / 11)


def test_the_average_is_updated_every_few_steps_with_the_decay_over_them() -> None:
    """`step` updates every EVERY optimiser steps, with the per-step decay raised to that power (the same horizon)."""
    model = _set(nn.Linear(1, 1, bias=False), 1.0)
    average = WeightAverage(model, decay=0.9, every=4)
    for _ in range(3):
        average.step(model)
    assert average.updates == 0 and average.steps == 3  # not yet
    average.step(model)
    assert average.updates == 1 and average.steps == 0 and average.module.weight.item() == pytest.approx(1.0)
    average.updates = 1000  # past the warm-up: the decay is the configured one, over four steps
    assert average.current_decay() == pytest.approx(0.9**4)
    average.step(_set(model, 0.0))
    restored = WeightAverage(nn.Linear(1, 1, bias=False), decay=0.9, every=4)
    restored.load_state_dict(average.state_dict())
    assert restored.steps == 1  # a resumed run updates on the same steps as one that was never stopped

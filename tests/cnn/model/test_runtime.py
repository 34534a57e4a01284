"""Devices and random state: an unavailable device is a clear error; a saved RNG state replays the same numbers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cnn.errors import UserError
from cnn.model.runtime import resolve_device, rng_state, seed_everything, set_rng_state


def test_devices_resolve_or_say_what_to_use() -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_a_saved_rng_state_replays_every_generator() -> None:
    seed_everything(3)
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first

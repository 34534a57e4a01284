"""Where and how tensors are computed: device choice, seeding and RNG state, weight loading, the model input."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnn.errors import UserError
from cnn.model.contract import to_model_input


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an unavailable device is a UserError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available; use --device auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain types (loadable with weights_only=True)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]  # legacy: a tuple
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": [list(map(int, random.getstate()[1]))],
        "python_version": int(random.getstate()[0]),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(state["python"][0]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict saved by `fit` (weights only: no pickled objects)."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


@dataclass
class Runtime:
    """The device, normalisation and autocast a training run computes with."""

    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return to_model_input(batch, self.mean, self.std, self.device, self.channels_last)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

"""An exponential moving average of a model's weights, kept beside the model as it trains.

torch's `AveragedModel` does the averaging (parameters and batch-norm buffers, with foreach kernels); the decay is
warmed up as (1 + n) / (10 + n) over the first updates, as timm's ModelEma does, so that a short run's average is
not dominated by its random start.

The average is updated every `EVERY` optimiser steps with the decay raised to that power, which keeps its horizon
(about 1 / (1 - decay) steps) while costing a quarter: at small images an update every step was a tenth of the step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

EVERY = 4  # optimiser steps between updates of the average


class WeightAverage:
    """The averaged copy of `model`: `step` after each optimiser step (it updates every `every`), `module` to validate
    and save."""

    def __init__(self, model: nn.Module, decay: float, every: int = EVERY) -> None:
        self.decay, self.updates, self.every, self.steps = decay, 0, every, 0
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        module: nn.Module = self.averaged.module
        return module

    def current_decay(self) -> float:
        """The decay of one update: the configured per-step decay over `every` steps, warmed up over the first."""
        return float(min(self.decay**self.every, (1 + self.updates) / (10 + self.updates)))

    def _average(
        self,
        averaged: tuple[Tensor, ...] | list[Tensor],
        current: tuple[Tensor, ...] | list[Tensor],
        count: Tensor | int,
    ) -> None:
        update = get_ema_multi_avg_fn(self.current_decay())  # type: ignore[no-untyped-call]  # torch leaves it untyped
        update(averaged, current, count)

    def step(self, model: nn.Module) -> None:
        """After an optimiser step: update the average every `every` steps."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.update(model)

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average now (also at the end of an epoch, so that the weights
        validated and saved include the last steps)."""
        self.averaged.update_parameters(model)
        self.updates += 1
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.updates, self.steps = int(state["updates"]), int(state.get("steps", 0))

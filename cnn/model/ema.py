"""An exponential moving average of a model's weights, kept beside the model as it trains.

torch's `AveragedModel` does the averaging (parameters and batch-norm buffers, with foreach kernels); the decay is
warmed up as (1 + n) / (10 + n) over the first updates, as timm's ModelEma does, so that a short run's average is
not dominated by its random start.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The averaged copy of `model`: `update` after each optimiser step, `module` to validate and save."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        module: nn.Module = self.averaged.module
        return module

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def _average(
        self,
        averaged: tuple[Tensor, ...] | list[Tensor],
        current: tuple[Tensor, ...] | list[Tensor],
        count: Tensor | int,
    ) -> None:
        update = get_ema_multi_avg_fn(self.current_decay())  # type: ignore[no-untyped-call]  # torch leaves it untyped
        update(averaged, current, count)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])

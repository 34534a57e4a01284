"""Time-budgeted training: measure the throughput in the first steps, then plan how many steps (and so epochs) fit
in the budget, so that the learning-rate schedule runs to its end inside it instead of being cut off.

- The first `PROBE_SKIP` steps are not timed (allocation, kernel selection, compilation); the next `PROBE_STEPS`
  are. Until the first epoch has been validated, an epoch's overhead (validation, checkpoint, loader start) is
  estimated from the validation images at the training rate; from then on it is measured.
- After every epoch the plan is made again from everything measured so far (seconds per step over all epochs,
  the mean overhead), so a misestimate early on is corrected while the schedule still has room to absorb it.
- `SAFETY` of the budget is held back for the noise of shared hosts; a hard deadline at the full budget stays as
  the last guard.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

PROBE_SKIP = 2
PROBE_STEPS = 10
SAFETY = 0.05
_VAL_COST = 0.5  # a validation image costs about this share of a training image (forward only, no augmentation)


@dataclass
class Schedule:
    """The per-step learning-rate factor: linear warm-up, then cosine decay to 1 % (or constant). A callable object,
    not a closure, so the scheduler's checkpoint keeps `total` (the plan) and a resumed run follows the same plan."""

    kind: str  # cosine | constant
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True)
class BudgetReport:
    """How the budget was spent; in fit.json, the run summary and MLflow."""

    budget_s: float
    used_s: float
    step_s: float  # measured seconds per training step
    overhead_s: float  # measured seconds per epoch outside the steps (validation, checkpoint, loader start)
    planned_steps: int
    planned_epochs: int
    first_plan_epochs: int  # what the probe planned, before the epochs' measurements refined it
    replans: int  # how often the plan changed after an epoch

    def describe(self) -> str:
        return (
            f"{self.used_s / 60:.1f} of {self.budget_s / 60:.1f} min used: {self.planned_epochs} epochs planned "
            f"({self.planned_steps} steps at {self.step_s * 1000:.0f} ms, {self.overhead_s:.1f} s per epoch besides; "
            f"first plan {self.first_plan_epochs} epochs, {self.replans} replans)"
        )


@dataclass
class Budget:
    """The plan of a budgeted run; `after_step` and `after_epoch` are called by the training loop."""

    seconds: float
    steps_per_epoch: int
    val_images: int
    batch_size: int
    schedule: Schedule
    steps: int = 0  # optimizer steps of the schedule so far (a resumed run starts at its checkpoint's)
    start: float = field(default_factory=time.monotonic)
    step_s: float | None = None
    overhead_s: list[float] = field(default_factory=list)
    train_s: float = 0.0  # seconds in training steps, summed over finished epochs
    train_steps: int = 0
    first_plan: int = 0
    replans: int = 0
    _taken: int = 0  # steps this process took (the probe times its own)
    _probe_start: float = 0.0

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    @property
    def epochs(self) -> int:
        """Epochs the plan runs (the last one may stop before its end)."""
        return max(1, math.ceil(self.schedule.total / self.steps_per_epoch))

    def after_step(self) -> bool:
        """Count a step; plan once the probe is timed. True when training must stop now: the planned steps are done,
        or (the last guard) the budget is spent."""
        self.steps += 1
        self._taken += 1
        now = time.monotonic()
        if self._taken == PROBE_SKIP:
            self._probe_start = now
        elif self._taken == PROBE_SKIP + PROBE_STEPS and self.step_s is None:
            self.step_s = (now - self._probe_start) / PROBE_STEPS
            self._plan(now)
            self.first_plan = self.epochs
        return (self.step_s is not None and self.steps >= self.schedule.total) or now > self.deadline

    def after_epoch(self, train_s: float, steps: int, epoch_s: float) -> None:
        """Record an epoch (`train_s` in its steps, `epoch_s` in all, validation included) and plan again."""
        self.train_s += train_s
        self.train_steps += steps
        self.overhead_s.append(max(0.0, epoch_s - train_s))
        self.step_s = self.train_s / max(1, self.train_steps)
        if self.first_plan and self.steps >= self.schedule.total:  # the plan ran to its end: nothing left to plan
            return
        before = self.schedule.total
        self._plan(time.monotonic())
        if not self.first_plan:  # the epoch was shorter than the probe: this is the first plan
            self.first_plan = self.epochs
        elif self.schedule.total != before:
            self.replans += 1

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def _plan(self, now: float) -> None:
        """Steps done, plus the rest of the current epoch, plus the whole epochs that fit in what is left; where the
        current epoch does not fit, the steps of it that do (leaving time to validate it)."""
        assert self.step_s is not None  # set before any plan
        left = self.deadline - self.seconds * SAFETY - now
        overhead, spe = self._overhead(), self.steps_per_epoch
        done_epochs, in_epoch = divmod(self.steps, spe)
        finish = ((spe - in_epoch) * self.step_s + overhead) if in_epoch else 0.0
        if finish > left:
            total = self.steps + max(1, math.floor((left - overhead) / self.step_s))
            total = min(total, (done_epochs + 1) * spe)
        else:
            whole = math.floor((left - finish) / max(spe * self.step_s + overhead, 1e-9))
            total = (done_epochs + (1 if in_epoch else 0) + max(0, whole)) * spe
        self.schedule.total = max(total, 1)
        if self.steps < self.schedule.warmup:  # still warming up: at most a fifth of the planned steps
            self.schedule.warmup = min(self.schedule.warmup, max(1, self.schedule.total // 5))

    def _overhead(self) -> float:
        if self.overhead_s:
            return sum(self.overhead_s) / len(self.overhead_s)
        assert self.step_s is not None
        return self.val_images / self.batch_size * self.step_s * _VAL_COST

    def report(self) -> BudgetReport:
        return BudgetReport(
            budget_s=self.seconds,
            used_s=time.monotonic() - self.start,
            step_s=self.step_s or 0.0,
            overhead_s=self._overhead() if self.step_s else 0.0,
            planned_steps=self.schedule.total,
            planned_epochs=self.epochs,
            first_plan_epochs=self.first_plan,
            replans=self.replans,
        )

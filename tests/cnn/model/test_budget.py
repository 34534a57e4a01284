"""Time-budgeted training: the plan fits whole epochs into the budget from the measured throughput, corrects itself
from each epoch's measurements, and a real budgeted run ends inside its budget with its schedule completed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnn.config import TrainConfig
from cnn.model import budget as budget_module
from cnn.model.budget import PROBE_SKIP, PROBE_STEPS, SAFETY, Budget, Schedule
from cnn.model.run import FitResult
from cnn.model.train import fit
from tests.cnn.conftest import FAST


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(budget_module.time, "monotonic", fake)
    return fake


def _run(plan: Budget, clock: Clock, step_s: float, overhead_s: float, max_epochs: int = 1000) -> int:
    """Drive `plan` like the training loop does: steps of `step_s`, then `overhead_s` per epoch; epochs run."""
    epochs = 0
    while epochs < plan.epochs and epochs < max_epochs:
        steps, stop = 0, False
        while steps < plan.steps_per_epoch and not stop:
            clock.now += step_s
            steps += 1
            stop = plan.after_step()
        clock.now += overhead_s
        plan.after_epoch(steps * step_s, steps, steps * step_s + overhead_s)
        epochs += 1
        if plan.out_of_time() or plan.steps >= plan.schedule.total:
            break
    return epochs


def test_probe_plans_whole_epochs_that_fit(clock: Clock) -> None:
    plan = Budget(100.0, 10, val_images=80, batch_size=16, schedule=Schedule("cosine", 10, 30), start=clock.now)
    for _ in range(PROBE_SKIP + PROBE_STEPS):
        clock.now += 0.1
        assert not plan.after_step()
    # 0.1 s a step, 10 steps an epoch, validation estimated at 5 batches x 0.1 s x 0.5: 1.25 s an epoch in 95 s
    assert plan.step_s == pytest.approx(0.1)
    assert plan.epochs == 76 and plan.schedule.total == 760 and plan.first_plan == 76


def test_the_plan_completes_the_schedule_inside_the_budget(clock: Clock) -> None:
    schedule = Schedule("cosine", 20, 60)
    plan = Budget(100.0, 20, val_images=80, batch_size=16, schedule=schedule, start=clock.now)
    epochs = _run(plan, clock, step_s=0.1, overhead_s=2.0)  # validation costs more than the probe guessed
    used = clock.now - plan.start
    assert not plan.out_of_time() and used <= 100.0
    assert used >= 100.0 * (1 - SAFETY) - 4.0  # the budget is used, less the held-back share and one 4 s epoch
    assert plan.steps == schedule.total == epochs * 20  # the schedule ran to its end
    assert schedule(schedule.total) == pytest.approx(0.01)
    report = plan.report()
    assert report.planned_epochs == epochs < report.first_plan_epochs and report.replans >= 1


def test_a_slower_host_midway_shortens_the_plan(clock: Clock) -> None:
    plan = Budget(60.0, 10, val_images=0, batch_size=16, schedule=Schedule("cosine", 0, 10), start=clock.now)
    _run(plan, clock, step_s=0.1, overhead_s=0.0, max_epochs=10)
    first = plan.epochs
    _run(plan, clock, step_s=0.3, overhead_s=0.0)  # three times slower from here on
    assert plan.epochs < first and not plan.out_of_time() and plan.steps == plan.schedule.total


def test_an_epoch_longer_than_the_budget_stops_inside_it(clock: Clock) -> None:
    plan = Budget(10.0, 1000, val_images=0, batch_size=16, schedule=Schedule("cosine", 0, 1000), start=clock.now)
    epochs = _run(plan, clock, step_s=0.1, overhead_s=0.0)
    assert epochs == 1 and plan.steps == plan.schedule.total < 1000 and not plan.out_of_time()


def test_a_budgeted_run_plans_its_epochs_and_ends_inside_the_budget(patterns: Path, tmp_path: Path) -> None:
    budget_s = 12.0
    cfg = TrainConfig(**{**FAST, "epochs": 2, "max_minutes": budget_s / 60, "schedule": "onecycle"})
    result = fit(cfg, patterns, tmp_path / "run")
    report = result.budget
    assert report is not None and result.stopped == "completed", (result.stopped, report, result.history)
    assert result.epochs_run == report.planned_epochs > 2  # planned from the budget, not --epochs
    assert 0.5 * budget_s < report.used_s <= budget_s
    assert result.history[-1].lr <= 0.02 * cfg.lr  # the schedule ran to its end, not cut
    result.save()
    assert FitResult.load(result.run_dir).budget == report  # kept in fit.json

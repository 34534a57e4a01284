"""The crashed-run automation: after a heartbeat, another heartbeat or a final state within the window, else
Crashed; the window is three heartbeat periods."""

from __future__ import annotations

import pytest

from flows.automations import CRASH_DETECTION, crash_after_s, crash_detection


def test_the_automation_expects_a_heartbeat_or_a_final_state_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    assert crash_after_s() == 90
    automation = crash_detection(90)
    trigger = automation.trigger
    assert automation.name == CRASH_DETECTION and trigger.within.total_seconds() == 90  # type: ignore[union-attr]
    assert trigger.after == {"prefect.flow-run.heartbeat"}  # type: ignore[union-attr]
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect  # type: ignore[union-attr]
    assert automation.actions[0].state.value == "CRASHED"  # type: ignore[union-attr]

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


def test_a_run_that_never_sent_a_heartbeat_is_crashed_once_silent_for_the_window(prefect_server: None) -> None:
    """A run whose client lost the server right after it went Running (its last events: Pending, Running; no
    heartbeat) never arms the automation; the next score, train, serve or `cnn automations` marks it Crashed once it
    has been silent for the window, and leaves a run that is still heard from alone."""
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Running

    from flows.automations import crash_stale_runs

    @flow(name="score")
    def score() -> None:
        """Stands for the score flow: only its name and its run's states matter here."""

    with get_client(sync_client=True) as client:
        lost = client.create_flow_run(score, state=Running())
        time.sleep(4)
        heard = client.create_flow_run(score, state=Running())
        marked = crash_stale_runs(within_s=3)
        assert str(lost.id) in marked and str(heard.id) not in marked
        assert client.read_flow_run(lost.id).state.type.value == "CRASHED"  # type: ignore[union-attr]
        assert client.read_flow_run(heard.id).state.type.value == "RUNNING"  # type: ignore[union-attr]
        client.set_flow_run_state(heard.id, Cancelled(), force=True)  # nothing left Running for the session

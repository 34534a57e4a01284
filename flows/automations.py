"""Prefect automations the deployments rely on: a flow run whose heartbeats stop (SIGKILL, OOM, a lost node)
is marked Crashed, so it never stays "Running" and never holds a deployment's concurrency slot forever.

Prefect's documented recipe (docs: "Detect zombie flows"): flow runs emit `prefect.flow-run.heartbeat` every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; a proactive trigger fires when a run that sent one sends neither
another nor a final state within the window, and its action sets the run's state to Crashed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

CRASH_DETECTION = "cnn: mark flow runs Crashed when their heartbeats stop"
HEARTBEAT_S = 60  # the workspace's PREFECT_FLOWS_HEARTBEAT_FREQUENCY unless the user sets one (Prefect: 180)
MISSED_BEATS = 3  # a run is declared dead after this many heartbeat periods of silence


def crash_after_s() -> int:
    """The silence after which a run counts as dead: MISSED_BEATS heartbeat periods."""
    return MISSED_BEATS * int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_S))


def crash_detection(within_s: int) -> AutomationCore:
    """The automation: after a heartbeat, expect another heartbeat or a final state within `within_s`."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=CRASH_DETECTION,
        description="A flow run that stopped sending heartbeats died without a word (kill -9, OOM, lost node).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_s} s: the process running this flow died",
            )
        ],
    )


def ensure_crash_detection(within_s: int | None = None) -> str:
    """Create the automation on the current Prefect API, or bring an existing one (by name) up to date;
    idempotent, so `cnn serve` and `cnn automations` can run it every time they start. Returns its id."""
    from prefect.client.orchestration import get_client

    automation = crash_detection(within_s or crash_after_s())
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(CRASH_DETECTION)
        if not existing:
            return str(client.create_automation(automation))
        first, *extra = existing
        client.update_automation(first.id, automation)
        for duplicate in extra:  # e.g. created twice by `prefect automation create -f`
            client.delete_automation(duplicate.id)
        return str(first.id)

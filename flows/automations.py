"""Prefect automations the deployments rely on: a flow run whose heartbeats stop (SIGKILL, OOM, a lost node)
is marked Crashed, so it never stays "Running" and never holds a deployment's concurrency slot forever.

Prefect's documented recipe (docs: "Detect zombie flows"): flow runs emit `prefect.flow-run.heartbeat` every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; a proactive trigger fires when a run that sent one sends neither
another nor a final state within the window, and its action sets the run's state to Crashed.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

CRASH_DETECTION = "cnn: mark flow runs Crashed when their heartbeats stop"
HEARTBEAT = "prefect.flow-run.heartbeat"
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
            after={HEARTBEAT},
            expect={
                HEARTBEAT,
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
    crash_stale_runs(within_s)  # runs that died while the server was down: the automation missed them
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(CRASH_DETECTION)
        if not existing:
            return str(client.create_automation(automation))
        first, *extra = existing
        client.update_automation(first.id, automation)
        for duplicate in extra:  # e.g. created twice by `prefect automation create -f`
            client.delete_automation(duplicate.id)
        return str(first.id)


FLOWS = ("ingest", "augment", "train", "score", "pipeline", "review-push", "review-pull", "tables")  # ours


def crash_stale_runs(within_s: int | None = None) -> list[str]:
    """Mark Crashed our flow runs still Running that have been silent for longer than the window: what the automation
    does, for runs it cannot judge because the server was down while their window passed (a proactive trigger is
    only evaluated while the server runs, so a run whose client lost the server stayed Running for good), and for
    runs that never sent a heartbeat (the automation waits for a first one). A run's last sign of life is its newest
    event (a heartbeat, a state change of it or of one of its tasks), else when it entered Running: our runs send
    a heartbeat every HEARTBEAT_S (the workspace, the compose file and the k8s template set it), so one silent for
    the window is dead. Returns the ids marked."""
    # imported here: Prefect's client loads only in the commands that talk to its server
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.events.filters import EventAnyResourceFilter, EventFilter
    from prefect.states import Crashed

    within = within_s or crash_after_s()
    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    marked = []
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))), flow_run_filter=running
        ):
            about = EventFilter(any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{run.id}"]))
            found = client.read_events(about, limit=1).events  # the newest first
            since = found[0].occurred if found else (run.state.timestamp if run.state else None)
            if since is None or now - since < timedelta(seconds=within):
                continue
            message = f"no sign of life for {within} s (found when the server was reachable again): the process died"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            marked.append(str(run.id))
    return marked


def crash_stale_runs_quietly() -> None:
    """`crash_stale_runs` at the start of a flow run on a shared server (PREFECT_API_URL): the next nightly run marks
    the runs that died while the server was down. Never fails the run that calls it."""
    if not os.environ.get("PREFECT_API_URL"):
        return  # a throwaway server: its runs are this command's own
    try:
        crash_stale_runs()
    except Exception as exc:  # noqa: BLE001 - housekeeping: the run goes on whatever the server answers
        logging.getLogger(__name__).warning("could not look for crashed flow runs: %s", exc)

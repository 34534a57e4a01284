"""deploy/prefect.yaml: every deployment points at a real flow, with parameters it accepts and valid schedules."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

PREFECT_YAML = Path(__file__).parents[2] / "deploy" / "prefect.yaml"


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_deployment_entrypoints_and_parameters(deployment: dict) -> None:
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    path, _, attribute = deployment["entrypoint"].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attribute)
    assert isinstance(flow, Flow)
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(deployment.get("parameters", {})) <= accepted
    flow.validate_parameters(deployment.get("parameters", {}))  # types check against the flow's signature
    for schedule in deployment.get("schedules", []):
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert deployment["work_pool"]["name"] in {"cpu", "gpu"}

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


def test_shard_retries_only_for_transient_failures() -> None:
    from types import SimpleNamespace

    from sqlalchemy.exc import IntegrityError, OperationalError

    from cnn.errors import UserError
    from flows.score import _transient

    def retried(exc: BaseException) -> bool:
        return _transient(None, None, SimpleNamespace(data=exc))

    assert retried(OperationalError("select 1", {}, Exception("server closed the connection")))
    assert retried(ConnectionResetError("reset by peer")) and retried(TimeoutError())
    assert not retried(UserError("invalid table name"))
    assert not retried(IntegrityError("insert", {}, Exception("duplicate key")))
    assert not retried(ValueError("bad input"))

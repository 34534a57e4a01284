"""Fan a flow's tasks out to Dask: an existing scheduler (`cluster`), or a local cluster of `dask_workers`.

The runner is entered inside the flow run, for the tasks that fan out, rather than fixed on the flow: a deployment
runs the flow as it is defined, so a `cluster` parameter has to take effect from within the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner

from cnn.config import ClusterConfig


@contextmanager
def fan_out(config: ClusterConfig) -> Iterator[TaskRunner[PrefectFuture[Any]] | None]:
    """A Dask task runner for the block, started as `config` asks; None when it asks for no fan-out."""
    if not config.fan_out:
        yield None
        return
    from prefect_dask import DaskTaskRunner

    if config.cluster:
        runner = DaskTaskRunner(address=config.cluster)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": config.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    with runner:
        yield runner

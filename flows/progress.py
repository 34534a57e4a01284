"""Progress for long work: a rich bar in the terminal and a Prefect progress artifact in the UI."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_ARTIFACT_EVERY_S = 1.0
log = logging.getLogger(__name__)


@contextmanager
def reported_progress(description: str, key: str | None = None) -> Iterator[Callable[[int, int], None]]:
    """Yield a `progress(done, total)` callback that drives a terminal bar and a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import get_run_context

    artifact_id = None
    try:
        get_run_context()
        artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    except Exception as exc:  # noqa: BLE001 - outside a run, or the API is unreachable: the bar still works
        log.debug("no progress artifact: %s", exc)
    last_update = 0.0
    console = Console(file=sys.stderr)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task_id = bar.add_task(description, total=None)

        def progress(done: int, total: int) -> None:
            nonlocal last_update
            bar.update(task_id, completed=done, total=total)
            now = time.monotonic()
            if artifact_id is not None and (now - last_update >= _ARTIFACT_EVERY_S or done == total):
                last_update = now
                update_progress_artifact(artifact_id, progress=100.0 * done / max(total, 1))

        yield progress

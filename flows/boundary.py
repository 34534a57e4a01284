"""The CLI's error boundary: every command configures the workspace once (before Prefect or MLflow are imported:
both read their settings when they load) and turns user errors into one line and an exit code, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from cnn.config import describe_validation_error
from cnn.errors import UserError

err_console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def command(func: F) -> F:
    """Configure the workspace, run the command, and turn UserError, invalid options and faults of the
    infrastructure (flows.faults: a full disk, a server that does not answer, a locked table) into one red line
    and a non-zero exit, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from flows import workspace

        try:
            workspace.configure()
            return func(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except ValidationError as exc:
            err_console.print(f"[bold red]error:[/] invalid options: {describe_validation_error(exc)}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:
            # imported here: only a failing command needs the classifier (and the SQLAlchemy types it reads)
            from flows.faults import infrastructure_fault

            fault = infrastructure_fault(exc)
            if fault is None:  # a bug: its traceback is what a maintainer needs
                raise
            err_console.print(f"[bold red]error:[/] {fault}", highlight=False)
            raise typer.Exit(fault.exit_code) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature typer reads

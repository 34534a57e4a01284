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
    """Configure the workspace, run the command, and turn UserError (and invalid options) into one red line and
    a non-zero exit, never a traceback."""

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

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature typer reads

"""`cnn review push|pull`: the review queue of a prediction table in Label Studio, and reviewers' answers back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cnn.errors import UserError
from flows.boundary import command

review_app = typer.Typer(
    help="Work a prediction table's review queue in Label Studio (docs/review.md).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
console = Console(soft_wrap=True)
TABLE = Annotated[
    str,
    typer.Argument(
        help="The prediction table, as `cnn score` named it: X.parquet|csv, a Delta folder or prefix, or a SQL "
        "URL#table (env:VARIABLE#table and secret:BLOCK#table keep the password out of sight)."
    ),
]
MODEL = Annotated[str, typer.Option("--model", help="The registered model whose review rows these are.")]
SECRET = Annotated[
    str | None,
    typer.Option(help="A Prefect Secret block holding the API token (else CNN_LABEL_STUDIO_TOKEN)."),
]


@review_app.command("push")
@command
def push(
    table: TABLE,
    model: MODEL,
    reviewers: Annotated[
        int | None,
        typer.Option(min=1, max=20, help="Reviewers who answer each image (default: the project's, 1 when new)."),
    ] = None,
    token_secret: SECRET = None,
) -> None:
    """Send the open review rows to the model's Label Studio project (created on first push; re-pushing updates)."""
    # imported here: Prefect, torch and pandas load only for this command, not at every `cnn` start
    from flows import credentials
    from flows.review import review_push_flow

    said = review_push_flow(credentials.by_reference(table) or table, model, reviewers, token_secret)
    console.print(f"{model}: {said}", highlight=False)


@review_app.command("pull")
@command
def pull(
    table: TABLE,
    model: MODEL,
    out: Annotated[
        Path | None,
        typer.Option(help="Also write the answered review rows to this .parquet/.csv file, for `cnn ingest`."),
    ] = None,
    token_secret: SECRET = None,
) -> None:
    """Bring reviewers' answers from Label Studio into the table's review queue (reviewed_label, reviewed_by,
    reviewed_at, review_verdict)."""
    # imported here: as above
    from flows import credentials
    from flows.review import review_pull_flow, write_answered

    if out is not None and out.suffix.lower() not in (".parquet", ".csv"):
        raise UserError(f"--out writes a .parquet or .csv file, not {out.name}")
    target = credentials.by_reference(table) or table
    summary = review_pull_flow(target, model, token_secret)
    console.print(f"{model}: {summary.said}", highlight=False)
    if out is not None:
        rows = write_answered(target, model, out)
        console.print(
            f"wrote {rows} answered review row(s) to {out}; add them to a dataset with: cnn ingest {out} "
            "--dataset NAME --allow-outside",
            highlight=False,
        )

"""What the CLI prints: tables of typed results, rendered with rich. Nothing here computes anything."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from rich.console import Console
from rich.table import Table

from cnn.data.dataset import Dataset
from cnn.data.report import DatasetReport

if TYPE_CHECKING:  # only named in annotations: `cnn score` must not import training and explanations to print
    from cnn.batch.run import ScoringSummary
    from flows.explain import ExplainOutcome, SimilarOutcome
    from flows.train import NodeOutcome, TrainOutcome

console = Console(soft_wrap=True)


def dataset_report(dataset_dir: Path) -> None:
    """The class table, rejects, duplicates and where the files are."""
    report = DatasetReport.load(dataset_dir)
    table = Table(title=f"dataset {report.dataset}: images per class and split")
    frame = report.class_table()
    table.add_column("class")
    for column in frame.columns:
        table.add_column(str(column), justify="right")
    for label, row in frame.iterrows():
        table.add_row(str(label), *(str(v) for v in row), style="bold" if label == "total" else None)
    console.print(table)
    if report.rejects_by_reason:
        rejects = Table(title=f"{report.rejected} rejected files")
        rejects.add_column("reason")
        rejects.add_column("files", justify="right")
        for reason, n in report.rejects_by_reason.items():
            rejects.add_row(reason, str(n))
        console.print(rejects)
    console.print(
        f"duplicates: {report.duplicate_sets} images appear more than once "
        f"({report.duplicate_files} extra files, kept in one split)"
    )
    for conflict in report.conflicting_duplicates:
        console.print(
            f"[yellow]warning:[/] {conflict['files']} identical files with labels {conflict['labels']}: "
            f"image_id {conflict['image_id'][:16]}... (see the manifest)",
            highlight=False,
        )
    if report.stats is not None:
        console.print(f"decoded {report.stats.decoded} files, {report.stats.reused} unchanged since the last ingest")
    ds = Dataset(dataset_dir)
    console.print(
        f"manifest: {ds.manifest_path}\nreport:   {dataset_dir / 'report.md'}\ncache:    {ds.cache_dir}",
        highlight=False,
    )


def training(outcome: TrainOutcome | NodeOutcome) -> None:
    """Test metrics and the gate's decision (or what a worker node did)."""
    # imported here: flows.train is heavy, and `cnn score` prints through this module too
    from flows.train import NodeOutcome

    if isinstance(outcome, NodeOutcome):
        console.print(f"node {outcome.node_rank} finished its part of the distributed training")
        return
    table = Table(title="test metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in outcome.test_metrics.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    if outcome.budget:
        console.print(f"time budget: {outcome.budget}", highlight=False)
    gate = outcome.gate
    colour = "green" if gate.decision == "champion" else "yellow"
    console.print(
        f"registered [bold]{gate.model}[/] v{gate.version} -> [{colour}]@{gate.decision}[/] ({gate.reason})",
        highlight=False,
    )
    console.print(
        f"MLflow run {outcome.run_id}; checkpoints in {outcome.run_dir}\nopen the MLflow UI with: cnn ui",
        highlight=False,
    )


def scoring(summary: ScoringSummary) -> None:
    """Counts per label, rejects by kind, review count, and where the tables are."""
    table = Table(title=f"scored with {summary.model} ({summary.precision})")
    table.add_column("item")
    table.add_column("count", justify="right")
    for row in summary.rows():
        table.add_row(str(row["item"]), str(row["count"]))
    console.print(table)
    if summary.precision_reason:
        console.print(f"precision: {summary.precision_reason}", highlight=False)
    if summary.drift:
        colour = "bold red" if summary.drifted else "green"
        console.print(f"[{colour}]{summary.drift}[/]", highlight=False)
    if summary.review_push:
        colour = "yellow" if "not pushed" in summary.review_push else "green"
        console.print(f"[{colour}]{summary.review_push}[/]", highlight=False)
    console.print(
        f"{summary.predicted} predictions, {summary.rejected} rejects, {summary.skipped} already "
        f"scored, {summary.retried} transient rejects tried again; tables:\n  " + "\n  ".join(summary.tables),
        highlight=False,
    )


def sample_predictions(parquet: Path, n: int = 6) -> None:
    """The first rows of a prediction file."""
    view = Table(title="sample predictions")
    for column in ("file", "label", "confidence", "needs_review", "model"):
        view.add_column(column)
    for row in pd.read_parquet(parquet).head(n).itertuples():
        view.add_row(
            Path(str(row.path)).name,
            str(row.label),
            f"{row.confidence:.3f}",
            str(row.needs_review),
            f"{row.model_name} v{row.model_version}",
        )
    console.print(view)


def explanations(outcome: ExplainOutcome) -> None:
    """Each image's label, decision and top classes, where its files went, and the files that failed."""
    table = Table(title=f"explained with {outcome.model}")
    for column in ("image", "label", "decision", "top classes (calibrated)", "files"):
        table.add_column(column)
    for source, e in outcome.explained:
        top = ", ".join(f"{c} {p:.3f}" for c, p in e.top)
        table.add_row(Path(source).name, e.label, e.decision, top, ", ".join(f.name for f in e.files))
    console.print(table)
    for source, reason in outcome.failed:
        console.print(f"[yellow]skipped[/] {source}: {reason}", highlight=False)
    console.print(f"written to {outcome.out_dir}", highlight=False)


def review_queue(path: Path, n: int = 6) -> None:
    """The most urgent rows of a review table: what a reviewer works through, with the reason for each."""
    rows = pd.read_parquet(path)
    view = Table(title=f"review queue: {len(rows)} rows, most urgent first ({path.name})")
    for column in ("file", "label", "decision", "confidence", "urgency", "why", "overlay"):
        view.add_column(column)
    for row in rows.head(n).itertuples():
        view.add_row(
            Path(str(row.path)).name,
            str(row.label),
            str(row.decision),
            f"{row.confidence:.3f}",
            f"{row.urgency:.3f}",
            str(row.review_reason),
            str(row.explanation or ""),
        )
    console.print(view)
    console.print(
        "a reviewer fills `reviewed_label`; `cnn ingest` of this file adds those images to the dataset",
        highlight=False,
    )


def model_card(markdown: str) -> None:
    """A model card, rendered."""
    from rich.markdown import Markdown

    console.print(Markdown(markdown))


def similar(outcome: SimilarOutcome) -> None:
    """The nearest training images and the nearest images scored before, as tables."""
    console.print(f"{outcome.model} predicts [bold]{outcome.label}[/]", highlight=False)
    for title, rows in (
        ("nearest training images", outcome.training),
        ("nearest images scored before", outcome.scored),
    ):
        if not rows:
            console.print(f"{title}: none", highlight=False)
            continue
        table = Table(title=title)
        columns = list(rows[0])
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(row.get(c, ""))[:24] if c == "image_id" else str(row.get(c, "")) for c in columns))
        console.print(table)
    console.print(f"contact sheet: {outcome.sheet}", highlight=False)

"""The `cnn` command line. Imports of Prefect and the flows happen inside commands, after the workspace
has set its environment defaults, so `cnn --help` is instant and settings are right."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

import cnn
from cnn.errors import UserError

app = typer.Typer(
    name="cnn",
    help="Batch image classification: ingest and augment images, train CNNs, register and score them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(func: F) -> F:
    """Turn UserError (and invalid options) into one red line and a non-zero exit, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        try:
            return func(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            err_console.print(f"[bold red]error:[/] invalid options: {problems}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"cnn {cnn.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Batch image classification pipeline (Prefect flows, MLflow tracking)."""


@app.command()
@_user_errors
def ingest(
    source: Annotated[Path, typer.Argument(help="Class folders, train/val/test folders, or a CSV/Parquet manifest.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name (folder under $CNN_HOME/datasets).")],
    image_size: Annotated[int, typer.Option(help="Side of the square cached images, in pixels.")] = 224,
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = 3,
    resize: Annotated[str, typer.Option(help="pad (letterbox, keeps the whole image) or crop (centre).")] = "pad",
    val_fraction: Annotated[float, typer.Option(help="Share of images for validation.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of images for test.")] = 0.15,
    group_column: Annotated[str, typer.Option(help="Manifest column holding the patient/claim id.")] = "group",
    seed: Annotated[int, typer.Option(help="Seed of the split draw.")] = 0,
    workers: Annotated[int, typer.Option(help="Decoding processes (0 = all cores).")] = 0,
    max_file_mb: Annotated[float, typer.Option(help="Reject files larger than this.")] = 256.0,
) -> None:
    """Ingest SOURCE: decode every image once, validate, split and cache it (Prefect flow `ingest`)."""
    from cnn.ingest import IngestOptions
    from flows import workspace

    ws = workspace.configure()
    options = IngestOptions(image_size=image_size, channels=channels, resize=resize, val_fraction=val_fraction,
                            test_fraction=test_fraction, group_column=group_column, seed=seed, workers=workers,
                            max_file_mb=max_file_mb)
    options.fractions()
    ws.dataset(dataset)
    if not source.exists():
        raise UserError(f"source not found: {source}")
    result = _run_ingest(str(source), dataset, options)
    _print_report(Path(result["dataset_dir"]))


def _run_ingest(source: str, dataset: str, options: Any) -> dict[str, str]:
    from flows.ingest import ingest_flow

    return ingest_flow(source=source, dataset=dataset, options=options)


def _print_report(dataset_dir: Path) -> None:
    from cnn.dataset import Dataset
    from cnn.report import DatasetReport

    import json

    data = json.loads((dataset_dir / "report.json").read_text())
    report = DatasetReport(**data)
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
    console.print(f"duplicates: {report.duplicate_sets} images appear more than once "
                  f"({report.duplicate_files} extra files, kept in one split)")
    for conflict in report.conflicting_duplicates:
        console.print(f"[yellow]warning:[/] identical files with labels {conflict['labels']}: "
                      f"{', '.join(conflict['paths'])}", highlight=False)
    stats = report.stats
    console.print(f"decoded {stats.get('decoded', 0)} files, {stats.get('reused', 0)} unchanged since the last ingest")
    ds = Dataset(dataset_dir)
    console.print(f"manifest: {ds.manifest_path}\nreport:   {dataset_dir / 'report.md'}\ncache:    {ds.cache_dir}",
                  highlight=False)


@app.command()
@_user_errors
def augment(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="An ingested dataset.")],
    policy: Annotated[str, typer.Option(help="Preset (none, xray, photo) or an albumentations YAML/JSON file.")],
    preview: Annotated[Path, typer.Option(help="Where to write the preview grid (.png or .jpg).")],
    rows: Annotated[int, typer.Option(help="Images in the preview (spread over classes).")] = 6,
    samples: Annotated[int, typer.Option(help="Augmented samples per image.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for sampling images and augmentations.")] = 0,
) -> None:
    """Validate an augmentation policy and render originals beside augmented samples (Prefect flow `augment`)."""
    from cnn.augment import load_policy
    from flows import workspace

    ws = workspace.configure()
    ws.dataset(dataset).require()
    load_policy(policy)
    from flows.augment import augment_flow

    out = augment_flow(dataset=dataset, policy=policy, preview=str(preview), rows=rows, augmented=samples, seed=seed)
    console.print(f"policy [bold]{policy}[/] is valid; preview written to {out}", highlight=False)


@app.command("demo-data")
@_user_errors
def demo_data(
    kind: Annotated[str, typer.Argument(help="xray or claims.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default $CNN_HOME/demo/KIND).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of images (default 600 each).")] = None,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same files.")] = 0,
    size: Annotated[int | None, typer.Option(help="Side of the generated images in pixels.")] = None,
) -> None:
    """Generate a deterministic synthetic dataset to try the pipeline on."""
    from cnn.demo_data import generate
    from flows import workspace

    target = out or workspace.configure().home / "demo" / kind
    made = generate(kind, target, n=n, seed=seed, size=size)
    console.print(f"wrote {made.images} {kind} images ({made.corrupt} deliberately corrupt files) to {made.root}\n"
                  f"ingest it with: cnn ingest {made.source} --dataset {kind}", highlight=False)


@app.command()
@_user_errors
def demo() -> None:
    """Run the main job on generated data: xray demo set -> ingest, then print the report."""
    from cnn.demo_data import generate
    from cnn.ingest import IngestOptions
    from flows import workspace

    ws = workspace.configure()
    console.rule("[bold]1/2 generate the xray demo set")
    made = generate("xray", ws.home / "demo" / "xray")
    console.print(f"{made.images} images + {made.corrupt} corrupt files in {made.root}", highlight=False)
    console.rule("[bold]2/2 ingest (Prefect flow `ingest`)")
    result = _run_ingest(str(made.source), "xray", IngestOptions(image_size=64, channels=1))
    _print_report(Path(result["dataset_dir"]))
    console.print(f"\nworkspace: {ws.home}\nPrefect state: {ws.prefect_home}\n"
                  f"next: cnn augment --dataset xray --policy xray --preview {ws.home / 'xray-preview.png'}",
                  highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())

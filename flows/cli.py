"""The `cnn` command line. Imports of Prefect and the flows happen inside commands, after the workspace
has set its environment defaults, so `cnn --help` is instant and settings are right."""

from __future__ import annotations

import functools
import os
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
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
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
    import json

    from cnn.dataset import Dataset
    from cnn.report import DatasetReport

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


@app.command()
@_user_errors
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="An ingested dataset.")],
    model: Annotated[str | None, typer.Option(help="Model name (see the README's list); default small_cnn.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    policy: Annotated[str | None, typer.Option(help="Augmentation preset or albumentations YAML/JSON file.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes (time budget).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local file of pretrained weights (never downloaded).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config; flags given here override it.")] = None,
    register_as: Annotated[str | None, typer.Option(help="Registered model name (default: the dataset name).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the latest interrupted run of this model.")] = False,
    nproc_per_node: Annotated[int | None, typer.Option(help="DDP processes on this node (torchrun).")] = None,
    nnodes: Annotated[int | None, typer.Option(help="Number of nodes in the DDP job.")] = None,
    node_rank: Annotated[int | None, typer.Option(help="This node's rank (0 tracks, registers and gates).")] = None,
    master_addr: Annotated[str | None, typer.Option(help="Address of node 0 for the rendezvous.")] = None,
    master_port: Annotated[int | None, typer.Option(help="Port of node 0 for the rendezvous.")] = None,
) -> None:
    """Train a CNN, track it in MLflow, register a version and gate its promotion (Prefect flow `train`)."""
    from cnn.config import TrainConfig
    from flows import workspace

    ws = workspace.configure()
    ws.dataset(dataset).require()
    cfg = TrainConfig.load(config, model=model, epochs=epochs, batch_size=batch_size, lr=lr, policy=policy,
                           device=device, max_minutes=max_minutes, weights=weights, register_as=register_as,
                           nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                           master_addr=master_addr, master_port=master_port)
    from cnn.dataset import validate_name
    from cnn.train import check_config

    validate_name(cfg.register_as or dataset)
    check_config(cfg)
    if cfg.node_rank > 0:  # other nodes of a multi-node job only compute; node 0 tracks and registers
        from flows.train import launch_distributed, run_directory

        name = cfg.register_as or dataset
        run_dir = run_directory(ws.home, name, resume) if resume else ws.home / "runs" / name / f"node-{cfg.node_rank}"
        launch_distributed(str(ws.dataset(dataset).root), str(run_dir), cfg, "", resume)
        console.print(f"node {cfg.node_rank} finished its part of the distributed training")
        return
    result = _run_train(dataset, cfg, resume)
    _print_training(result)


def _run_train(dataset: str, cfg: Any, resume: bool = False) -> dict[str, Any]:
    from flows.train import train_flow

    return train_flow(dataset=dataset, config=cfg, resume=resume)


def _print_training(result: dict[str, Any]) -> None:
    table = Table(title="test metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["test_metrics"].items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    gate = result["gate"]
    colour = "green" if gate["decision"] == "champion" else "yellow"
    console.print(f"registered [bold]{gate['model']}[/] v{gate['version']} -> [{colour}]@{gate['decision']}[/]"
                  f" ({gate['reason']})", highlight=False)
    console.print(f"MLflow run {result['run_id']}; checkpoints in {result['run_dir']}\n"
                  f"open the MLflow UI with: cnn ui", highlight=False)


@app.command()
@_user_errors
def score(
    source: Annotated[str, typer.Argument(help="Folder (recursive), glob, or CSV/Parquet manifest with a path column.")],
    model: Annotated[str, typer.Option(help="MODEL (= MODEL@champion), MODEL@alias or MODEL:version.")],
    output: Annotated[str | None, typer.Option(help="Prediction file, .parquet or .csv (rejects beside it).")] = None,
    table: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL#table (default sqlite:///$CNN_HOME/predictions.db#predictions when no --output).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    top_k: Annotated[int, typer.Option(help="How many ranked labels to keep per image.")] = 3,
    review_below: Annotated[float, typer.Option(help="Flag predictions whose confidence is below this.")] = 0.0,
    decode_workers: Annotated[int, typer.Option(help="Decoding processes (0 = all cores).")] = 0,
    shard_size: Annotated[int, typer.Option(help="Files per shard (each shard commits on its own).")] = 256,
    cluster: Annotated[str | None, typer.Option(help="Dask scheduler address (tcp://host:8786): shards fan out to it.")] = None,
    workers: Annotated[int, typer.Option(help="Fan shards out to a local Dask cluster of N worker processes.")] = 0,
    precision: Annotated[str, typer.Option(help="auto (bf16 on CPUs with native bf16 when validated), fp32, bf16.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (pays back on large batches).")] = False,
) -> None:
    """Score new images with a registered model into prediction tables, exactly once (Prefect flow `score`)."""
    from flows import workspace

    workspace.configure()
    from flows.models import parse_spec
    from flows.score import score_flow

    parse_spec(model)
    if workers < 0:
        raise UserError("--workers must be 0 (no Dask) or a number of Dask workers")
    fan_out = bool(cluster or workers)
    runner = score_flow
    if fan_out:
        from flows.score import on_dask

        runner = on_dask(cluster, workers)
    summary = runner(source=source, model=model, output=output, table=table, batch_size=batch_size,
                     device=device, top_k=top_k, review_below=review_below, workers=decode_workers,
                     shard_size=shard_size, precision=precision, fan_out=fan_out, compile=compile)
    _print_scoring(summary)


def _print_scoring(summary: dict[str, Any]) -> None:
    table = Table(title=f"scored with {summary['model']} ({summary['precision']})")
    table.add_column("item")
    table.add_column("count", justify="right")
    for row in summary["table"]:
        table.add_row(row["item"], str(row["count"]))
    console.print(table)
    console.print(f"{summary['predicted']} predictions, {summary['rejected']} rejects, {summary['skipped']} already "
                  f"scored; tables:\n  " + "\n  ".join(summary["tables"]), highlight=False)


@app.command()
@_user_errors
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Option(help="Version to make @champion.")],
) -> None:
    """Make a version the @champion by hand (the old champion keeps @previous)."""
    from flows import workspace

    workspace.configure()
    from flows.registry import promote as promote_version

    console.print(promote_version(model, str(version)), highlight=False)


@app.command()
@_user_errors
def rollback(model: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Swap @champion and @previous: the previous champion serves again."""
    from flows import workspace

    workspace.configure()
    from flows.registry import rollback as rollback_model

    console.print(rollback_model(model), highlight=False)


@app.command()
@_user_errors
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on this workspace's tracking store."""
    import os
    import subprocess

    from flows import workspace

    ws = workspace.configure()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    console.print(f"MLflow UI for {uri}\nopen http://{host}:{port} in a browser (Ctrl-C stops it)", highlight=False)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri == ws.default_tracking_uri:
        command += ["--default-artifact-root", ws.mlflow_artifacts.as_uri()]
    try:
        raise typer.Exit(subprocess.call(command))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
@_user_errors
def serve(
    model: Annotated[str, typer.Option(help="Registered model the nightly scoring uses (its @champion).")] = "xray",
    incoming: Annotated[Path | None, typer.Option(help="Folder scored on schedule (default $CNN_HOME/incoming).")] = None,
    output: Annotated[str | None, typer.Option(help="Prediction file (.parquet/.csv) for scheduled scoring.")] = None,
    table: Annotated[str | None, typer.Option(help="SQLAlchemy URL#table (default: SQLite under CNN_HOME).")] = None,
    score_cron: Annotated[str, typer.Option(help="Cron of the scoring deployment (UTC).")] = "0 2 * * *",
    train_cron: Annotated[str, typer.Option(help="Cron of the training deployment (UTC); '' turns it off.")] = "0 3 * * 0",
    dataset: Annotated[str | None, typer.Option(help="Dataset the scheduled training uses (default: MODEL).")] = None,
    config: Annotated[Path | None, typer.Option(help="Training config YAML for the scheduled training.")] = None,
    port: Annotated[int, typer.Option(help="Port of the local Prefect server (when PREFECT_API_URL is unset).")] = 4200,
) -> None:
    """Serve the scheduled `score` and `train` deployments until Ctrl-C (starts a local Prefect server if needed)."""
    from cnn.config import TrainConfig
    from flows import workspace
    from flows.serve import deployments, start_local_server

    ws = workspace.configure()
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        api_url, server = start_local_server(ws, port)
        os.environ["PREFECT_API_URL"] = api_url
        os.environ.pop("PREFECT_SERVER_EPHEMERAL_ENABLED", None)
    folder = (incoming or ws.home / "incoming").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    train_config = TrainConfig.load(config).model_dump(mode="json") if config else None
    params = {"incoming": str(folder), "model": model, "output": output, "table": table, "score_cron": score_cron,
              "train_cron": train_cron, "dataset": dataset or model, "config": train_config}
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    console.print(f"serving deployments score/nightly ({score_cron}) over {folder}"
                  + (f" and train/scheduled ({train_cron}) on dataset {params['dataset']}" if train_cron else "")
                  + f"\nPrefect API {os.environ['PREFECT_API_URL']} (UI {ui}); Ctrl-C stops", highlight=False)
    try:
        from prefect import serve as prefect_serve

        prefect_serve(*deployments(params))
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        if server is not None:
            from flows.serve import server_marker

            server_marker(ws).unlink(missing_ok=True)
            server.terminate()
            try:
                server.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a server that will not stop is killed
                server.kill()


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
    """Run the main job on generated data: xray demo set -> ingest -> train -> register -> score a new batch."""
    from cnn.config import TrainConfig
    from cnn.demo_data import generate
    from cnn.ingest import IngestOptions
    from flows import workspace

    ws = workspace.configure()
    console.rule("[bold]1/4 generate the xray demo set")
    made = generate("xray", ws.home / "demo" / "xray")
    console.print(f"{made.images} images + {made.corrupt} corrupt files in {made.root}", highlight=False)
    console.rule("[bold]2/4 ingest (Prefect flow `ingest`)")
    result = _run_ingest(str(made.source), "xray", IngestOptions(image_size=64, channels=1))
    _print_report(Path(result["dataset_dir"]))
    console.rule("[bold]3/4 train, register and gate (Prefect flow `train`)")
    cfg = TrainConfig(model="small_cnn", epochs=30, batch_size=32, lr=3e-3, policy="none", patience=10)
    _print_training(_run_train("xray", cfg))
    console.rule("[bold]4/4 score a fresh batch with xray@champion (Prefect flow `score`)")
    batch = generate("xray", ws.home / "incoming" / "xray-batch", n=60, seed=1)
    _score_demo_batch(ws.home, batch.root / "images")
    console.print(f"\nworkspace: {ws.home}\nPrefect state: {ws.prefect_home}\n"
                  f"MLflow store: {os.environ.get('MLFLOW_TRACKING_URI')} (browse it with: cnn ui)\n"
                  f"try: cnn augment --dataset xray --policy xray --preview {ws.home / 'xray-preview.png'}\n"
                  f"     cnn serve   (nightly scoring of {ws.home / 'incoming'})", highlight=False)


def _score_demo_batch(home: Path, images: Path) -> None:
    """Score the batch into Parquet + SQLite, then CSV (the SQL rows are upserted, never doubled)."""
    import pandas as pd

    from flows.score import score_flow

    table = f"sqlite:///{home / 'predictions.db'}#predictions"
    parquet, csv = home / "predictions" / "xray.parquet", home / "predictions" / "xray.csv"
    summary = score_flow(source=str(images), model="xray", output=str(parquet), table=table, review_below=0.6)
    score_flow(source=str(images), model="xray", output=str(csv), table=table, review_below=0.6)
    _print_scoring(summary)
    sample = pd.read_parquet(parquet).head(6)
    view = Table(title="sample predictions")
    for column in ("file", "label", "confidence", "needs_review", "model"):
        view.add_column(column)
    for row in sample.itertuples():
        view.add_row(Path(row.path).name, row.label, f"{row.confidence:.3f}", str(row.needs_review),
                     f"{row.model_name} v{row.model_version}")
    console.print(view)
    console.print(f"prediction tables:\n  Parquet {parquet} (+ {parquet.stem}.rejects.parquet)\n  CSV     {csv}"
                  f" (+ {csv.stem}.rejects.csv)\n  SQLite  {table} (+ predictions_rejects)", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())

"""The `cnn` command line: parse arguments into typed configs, call one flow entry point, render its typed result.

It orchestrates nothing. Every command goes through `_command`, which configures the workspace once (before
Prefect or MLflow are imported: both read their settings when they load) and turns user errors into one line
and exit code 2. Defaults shown in `--help` come from the configs themselves, so they cannot drift.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

import cnn
from cnn.config import ScoreConfig, TrainConfig, describe_validation_error
from cnn.data.ingest import IngestOptions
from cnn.errors import UserError
from cnn.io import storage

app = typer.Typer(
    name="cnn",
    help="Batch image classification: ingest and augment images, train CNNs, register and score them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags show as flags, choices as {a|b}
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def _command(func: F) -> F:
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


def _help(model: type[BaseModel], field: str, text: str) -> str:
    """Option help that states the config's own default."""
    default = model.model_fields[field].get_default(call_default_factory=True)
    return f"{text} (default: {'none' if default is None else default})"


def _version(value: bool) -> None:
    if value:
        console.print(f"cnn {cnn.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Batch image classification pipeline (Prefect flows, MLflow tracking)."""


ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML config; options given here override it.")]
CrashAfter = Annotated[
    int | None,
    typer.Option(
        min=10,
        help="Seconds without a heartbeat after which a run is marked Crashed "
        "(default: 3 x PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180).",
    ),
]


@app.command()
@_command
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="Class folders, train/val/test folders, or a CSV/Parquet manifest; a folder or path or an object "
            "store URL (s3://bucket/prefix, gs://..., az://..., file://...)."
        ),
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name (folder under $CNN_HOME/datasets).")],
    config: ConfigFile = None,
    image_size: Annotated[
        int | None,
        typer.Option(help=_help(IngestOptions, "image_size", "Side of the square cached images, in pixels.")),
    ] = None,
    channels: Annotated[
        Literal["1", "3"] | None, typer.Option(help=_help(IngestOptions, "channels", "1 (grayscale) or 3 (RGB)."))
    ] = None,
    resize: Annotated[
        Literal["pad", "crop"] | None,
        typer.Option(help=_help(IngestOptions, "resize", "pad (letterbox, keeps the whole image) or crop (centre).")),
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help=_help(IngestOptions, "val_fraction", "Share of images for validation."))
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help=_help(IngestOptions, "test_fraction", "Share of images for test."))
    ] = None,
    group_column: Annotated[
        str | None,
        typer.Option(help=_help(IngestOptions, "group_column", "Manifest column holding the patient/claim id.")),
    ] = None,
    seed: Annotated[int | None, typer.Option(help=_help(IngestOptions, "seed", "Seed of the split draw."))] = None,
    decode_workers: Annotated[
        int | None, typer.Option(help=_help(IngestOptions, "decode_workers", "Decoding processes (0 = all cores)."))
    ] = None,
    decode_time_limit: Annotated[
        float | None,
        typer.Option(help=_help(IngestOptions, "decode_time_limit_s", "Seconds one file may take to decode.")),
    ] = None,
    max_file_mb: Annotated[
        float | None, typer.Option(help=_help(IngestOptions, "max_file_mb", "Reject files larger than this many MiB."))
    ] = None,
    add: Annotated[
        bool | None,
        typer.Option(
            "--add/--replace",
            help="Add SOURCE's files to the dataset instead of replacing its file list (a filled-in review table "
            "always adds).",
        ),
    ] = None,
    cluster: Annotated[
        str | None, typer.Option(help="Dask scheduler address (tcp://host:8786): the decoding fans out to it.")
    ] = None,
    dask_workers: Annotated[
        int | None,
        typer.Option(help=_help(IngestOptions, "dask_workers", "Decode on a local Dask cluster of N processes.")),
    ] = None,
    files_per_part: Annotated[
        int | None,
        typer.Option(help=_help(IngestOptions, "files_per_part", "Files per decode task on Dask (a shard each).")),
    ] = None,
) -> None:
    """Ingest SOURCE: decode every image once, validate, split and cache it (Prefect flow `ingest`)."""
    from flows import render, workspace
    from flows.ingest import ingest_flow

    options = IngestOptions.load(
        config,
        image_size=image_size,
        channels=None if channels is None else int(channels),
        resize=resize,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        group_column=group_column,
        seed=seed,
        decode_workers=decode_workers,
        max_file_mb=max_file_mb,
        decode_time_limit_s=decode_time_limit,
        add=add,
        cluster=cluster,
        dask_workers=dask_workers,
        files_per_part=files_per_part,
    )
    options.fractions()
    workspace.current().dataset(dataset)
    source = storage.local_path(source)
    if not storage.is_url(source) and not Path(source).expanduser().exists():
        raise UserError(f"source not found: {source}")
    outcome = ingest_flow(source=source, dataset=dataset, options=options)
    render.dataset_report(Path(outcome.dataset_dir))


@app.command()
@_command
def augment(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="An ingested dataset.")],
    policy: Annotated[
        str,
        typer.Option(help="Preset (none, xray, photo, shift, light, auto) or an albumentations YAML/JSON file."),
    ],
    preview: Annotated[Path, typer.Option(help="Where to write the preview grid (.png or .jpg).")],
    rows: Annotated[int, typer.Option(help="Images in the preview (spread over classes).")] = 6,
    samples: Annotated[int, typer.Option(help="Augmented samples per image.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for sampling images and augmentations.")] = 0,
) -> None:
    """Validate an augmentation policy and render originals beside augmented samples (Prefect flow `augment`)."""
    from cnn.data.augment import load_policy, resolve_policy
    from flows import workspace

    workspace.current().dataset(dataset).require()
    load_policy(resolve_policy(policy, 3))  # a bad name fails here, before a flow starts
    from flows.augment import augment_flow

    out = augment_flow(dataset=dataset, policy=policy, preview=str(preview), rows=rows, augmented=samples, seed=seed)
    console.print(f"policy [bold]{policy}[/] is valid; preview written to {out}", highlight=False)


@app.command()
@_command
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="An ingested dataset.")],
    config: ConfigFile = None,
    model: Annotated[str | None, typer.Option(help=_help(TrainConfig, "model", "Model name (see the README)."))] = None,
    epochs: Annotated[int | None, typer.Option(help=_help(TrainConfig, "epochs", "Number of epochs."))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_help(TrainConfig, "batch_size", "Images per batch."))] = None,
    lr: Annotated[float | None, typer.Option(help=_help(TrainConfig, "lr", "Peak learning rate."))] = None,
    policy: Annotated[
        str | None,
        typer.Option(help=_help(TrainConfig, "policy", "Augmentation preset or albumentations YAML/JSON file.")),
    ] = None,
    device: Annotated[str | None, typer.Option(help=_help(TrainConfig, "device", "auto, cpu, cuda or cuda:N."))] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            help=_help(TrainConfig, "max_minutes", "Time budget: epochs and schedule are planned to end inside it.")
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Pretrained weights: a local state_dict file, or imagenet (torchvision's published weights for "
            "--model, from torch's cache; see --download-weights)."
        ),
    ] = None,
    precision: Annotated[
        Literal["auto", "fp32", "bf16"] | None,
        typer.Option(help=_help(TrainConfig, "precision", "CPU training: auto takes bf16 where its steps run faster.")),
    ] = None,
    download_weights: Annotated[
        bool | None,
        typer.Option(
            "--download-weights/--no-download-weights",
            help=_help(TrainConfig, "download_weights", "Let --weights imagenet download into torch's cache."),
        ),
    ] = None,
    register_as: Annotated[str | None, typer.Option(help="Registered model name (default: the dataset name).")] = None,
    gate_min_score: Annotated[
        float | None,
        typer.Option(help=_help(TrainConfig, "gate_min_score", "Never crown a version scoring below this.")),
    ] = None,
    gate_confidence: Annotated[
        float | None,
        typer.Option(help=_help(TrainConfig, "gate_confidence", "Confidence the improvement must reach.")),
    ] = None,
    replace_task: Annotated[
        bool | None,
        typer.Option(
            "--replace-task/--no-replace-task",
            help=_help(TrainConfig, "replace_task", "Let other classes or another dataset replace the champion."),
        ),
    ] = None,
    operating_point: Annotated[
        list[str] | None,
        typer.Option(
            help="CLASS:sensitivity>=0.95, CLASS:specificity>=0.9, CLASS:precision>=0.8 or CLASS:0.3 (a threshold); "
            "repeat for more, the first that fires decides. Chosen on validation, checked on test."
        ),
    ] = None,
    gate_operating_points: Annotated[
        bool | None,
        typer.Option(
            "--gate-operating-points/--no-gate-operating-points",
            help=_help(TrainConfig, "gate_operating_points", "Crown only when every operating point holds on test."),
        ),
    ] = None,
    intended_use: Annotated[str | None, typer.Option(help="The model card's intended use.")] = None,
    limitations: Annotated[str | None, typer.Option(help="The model card's known limitations.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the latest interrupted run of this model.")
    ] = False,
    nproc_per_node: Annotated[
        int | None, typer.Option(help=_help(TrainConfig, "nproc_per_node", "DDP processes on this node (torchrun)."))
    ] = None,
    nnodes: Annotated[int | None, typer.Option(help=_help(TrainConfig, "nnodes", "Nodes in the DDP job."))] = None,
    node_rank: Annotated[
        int | None,
        typer.Option(help=_help(TrainConfig, "node_rank", "This node's rank (0 tracks, registers and gates).")),
    ] = None,
    master_addr: Annotated[
        str | None, typer.Option(help=_help(TrainConfig, "master_addr", "Address of node 0 for the rendezvous."))
    ] = None,
    master_port: Annotated[
        int | None, typer.Option(help=_help(TrainConfig, "master_port", "Port of node 0 for the rendezvous."))
    ] = None,
) -> None:
    """Train a CNN, track it in MLflow, register a version and gate its promotion (Prefect flow `train`)."""
    from flows import render
    from flows.train import train as run_training

    cfg = TrainConfig.load(
        config,
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        policy=policy,
        device=device,
        max_minutes=max_minutes,
        weights=weights,
        precision=precision,
        download_weights=download_weights,
        register_as=register_as,
        gate_min_score=gate_min_score,
        gate_confidence=gate_confidence,
        replace_task=replace_task,
        operating_points=operating_point or None,
        gate_operating_points=gate_operating_points,
        intended_use=intended_use,
        limitations=limitations,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
    )
    render.training(run_training(dataset, cfg, resume))


@app.command()
@_command
def score(
    source: Annotated[
        str,
        typer.Argument(
            help="Folder (recursive), glob, or CSV/Parquet manifest with a path column; local, or an object store "
            "URL (s3://bucket/incoming/, s3://bucket/incoming/**/*.jpg, s3://bucket/batch.csv)."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(help="MODEL (= MODEL@champion), MODEL@alias or MODEL:version (required here or in --config)."),
    ] = None,
    config: ConfigFile = None,
    output: Annotated[
        str | None,
        typer.Option(
            help="Prediction file, .parquet or .csv (rejects beside it); a path or an object store URL "
            "(s3://bucket/preds/night.parquet: published with a manifest object written last)."
        ),
    ] = None,
    table: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL#table (default sqlite:///$CNN_HOME/predictions.db#predictions when no --output)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=_help(ScoreConfig, "batch_size", "Images per forward pass."))
    ] = None,
    device: Annotated[str | None, typer.Option(help=_help(ScoreConfig, "device", "auto, cpu, cuda or cuda:N."))] = None,
    top_k: Annotated[
        int | None, typer.Option(help=_help(ScoreConfig, "top_k", "Ranked labels kept per image."))
    ] = None,
    review_below: Annotated[
        float | None,
        typer.Option(
            help=_help(ScoreConfig, "review_below", "Flag predictions whose confidence is below this (0 = off).")
        ),
    ] = None,
    decode_workers: Annotated[
        int | None, typer.Option(help=_help(ScoreConfig, "decode_workers", "Decoding processes (0 = all cores)."))
    ] = None,
    decode_time_limit: Annotated[
        float | None,
        typer.Option(help=_help(ScoreConfig, "decode_time_limit_s", "Seconds one file may take to decode.")),
    ] = None,
    shard_size: Annotated[
        int | None,
        typer.Option(help=_help(ScoreConfig, "shard_size", "Files per shard (each shard commits on its own).")),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            help=_help(
                ScoreConfig,
                "max_attempts",
                "Runs that try a file whose reject was transient (truncated, I/O error, time limit, worker died).",
            )
        ),
    ] = None,
    partition_by: Annotated[
        str | None,
        typer.Option(
            help="Write --output (a folder or prefix) as a Hive-partitioned Parquet table by these comma-separated "
            "columns: date (the UTC day scored), label, decision, model_name, model_version."
        ),
    ] = None,
    pseudonymize: Annotated[
        list[str] | None,
        typer.Option(
            help="Write this carried id column (repeat for more; `path` too) as keyed pseudonyms "
            "(HMAC-SHA256 with CNN_PSEUDONYM_KEY or $CNN_HOME/pseudonym.key)."
        ),
    ] = None,
    rescore: Annotated[
        bool | None,
        typer.Option(
            "--rescore/--no-rescore",
            help=_help(
                ScoreConfig,
                "rescore",
                "Score every input again with this version (after a new champion); earlier rows are kept.",
            ),
        ),
    ] = None,
    explain: Annotated[
        Literal["none", "review", "all"] | None,
        typer.Option(help=_help(ScoreConfig, "explain", "Grad-CAM overlays beside the output for these rows.")),
    ] = None,
    review_flips: Annotated[
        bool | None,
        typer.Option(
            "--review-flips/--no-review-flips",
            help=_help(ScoreConfig, "review_flips", "Review rows whose mirror image gets another label."),
        ),
    ] = None,
    review_margin: Annotated[
        float | None,
        typer.Option(help=_help(ScoreConfig, "review_margin", "Review rows this close to an operating point.")),
    ] = None,
    embeddings: Annotated[
        bool | None,
        typer.Option(
            "--embeddings/--no-embeddings", help=_help(ScoreConfig, "embeddings", "Keep each image's embedding.")
        ),
    ] = None,
    similar_cases: Annotated[
        bool | None,
        typer.Option(
            "--similar/--no-similar",
            help=_help(ScoreConfig, "similar", "Nearest training images and the reuse check."),
        ),
    ] = None,
    drift: Annotated[
        bool | None,
        typer.Option("--drift/--no-drift", help=_help(ScoreConfig, "drift", "Check the batch for drift.")),
    ] = None,
    fail_on_drift: Annotated[
        bool | None,
        typer.Option(
            "--fail-on-drift/--no-fail-on-drift",
            help=_help(ScoreConfig, "fail_on_drift", "Exit 3 when the batch drifted (tables are written)."),
        ),
    ] = None,
    cluster: Annotated[
        str | None, typer.Option(help="Dask scheduler address (tcp://host:8786): shards fan out to it.")
    ] = None,
    dask_workers: Annotated[
        int | None,
        typer.Option(help=_help(ScoreConfig, "dask_workers", "Fan shards out to a local Dask cluster of N processes.")),
    ] = None,
    precision: Annotated[
        Literal["auto", "fp32", "bf16"] | None,
        typer.Option(help=_help(ScoreConfig, "precision", "auto: bf16 where it agrees with fp32 and is faster here.")),
    ] = None,
    backend: Annotated[
        Literal["auto", "torch", "onnxruntime", "openvino"] | None,
        typer.Option(
            help=_help(
                ScoreConfig,
                "backend",
                "auto: the fastest here of torch and the ONNX export in ONNX Runtime and "
                "OpenVINO (fp32, bf16, int8) that agrees with fp32.",
            )
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help=_help(ScoreConfig, "compile", "torch.compile the model.")),
    ] = None,
) -> None:
    """Score new images with a registered model into prediction tables, exactly once (Prefect flow `score`)."""
    from flows import render
    from flows.score import score as run_scoring

    if model is None and config is None:
        raise UserError(
            "--model is required: MODEL (its @champion), MODEL@alias or MODEL:version (or model: in --config)"
        )
    cfg = ScoreConfig.load(
        config,
        model=model,
        output=output,
        table=table,
        batch_size=batch_size,
        device=device,
        top_k=top_k,
        review_below=review_below,
        decode_workers=decode_workers,
        decode_time_limit_s=decode_time_limit,
        shard_size=shard_size,
        max_attempts=max_attempts,
        partition_by=[c.strip() for c in partition_by.split(",") if c.strip()] if partition_by else None,
        pseudonymize=pseudonymize or None,
        rescore=rescore,
        explain=explain,
        review_flips=review_flips,
        review_margin=review_margin,
        embeddings=embeddings,
        similar=similar_cases,
        drift=drift,
        fail_on_drift=fail_on_drift,
        cluster=cluster,
        dask_workers=dask_workers,
        precision=precision,
        backend=backend,
        compile=compile,
    )
    render.scoring(run_scoring(source, cfg))


@app.command("explain")
@_command
def explain_images(
    images: Annotated[list[str], typer.Argument(help="Image files (paths or object store URLs) to explain.")],
    model: Annotated[str, typer.Option(help="MODEL (= MODEL@champion), MODEL@alias or MODEL:version.")],
    out: Annotated[Path, typer.Option(help="Folder for the overlays, feature-map grids and JSON.")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Show why a registered version decided: Grad-CAM overlays, feature maps of each block, top classes."""
    from flows import render
    from flows.explain import explain

    outcome = explain([storage.local_path(p) for p in images], model, out, device)
    render.explanations(outcome)
    if not outcome.explained:
        raise UserError("no image could be read; nothing was explained")


@app.command()
@_command
def similar(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    model: Annotated[str, typer.Option(help="MODEL (= MODEL@champion), MODEL@alias or MODEL:version.")],
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="How many neighbours.")] = 10,
    out: Annotated[
        Path | None, typer.Option(help="Contact sheet PNG (default: IMAGE's name + .similar.png here).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """The most similar training images and previously scored images, by the model's embeddings."""
    from flows import render
    from flows.explain import similar as find_similar

    render.similar(find_similar(str(image), model, k, out or Path(f"{image.stem}.similar.png"), device))


@app.command()
@_command
def card(model: Annotated[str, typer.Argument(help="MODEL (= MODEL@champion), MODEL@alias or MODEL:version.")]) -> None:
    """Print a registered version's model card (also its description in the MLflow registry)."""
    from rich.markdown import Markdown

    from flows.explain import card as read_card

    console.print(Markdown(read_card(model)))


@app.command()
@_command
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Option(help="Version to make @champion.")],
) -> None:
    """Make a version the @champion by hand (the old champion keeps @previous)."""
    from flows.registry import promote as promote_version

    console.print(promote_version(model, str(version)), highlight=False)


@app.command()
@_command
def rollback(model: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Swap @champion and @previous: the previous champion serves again."""
    from flows.registry import rollback as rollback_model

    console.print(rollback_model(model), highlight=False)


@app.command()
@_command
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on this workspace's tracking store."""
    from flows import workspace
    from flows.processes import run_group

    ws = workspace.current()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    console.print(f"MLflow UI for {uri}\nopen http://{host}:{port} in a browser (Ctrl-C stops it)", highlight=False)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri == ws.default_tracking_uri:
        command += ["--default-artifact-root", ws.mlflow_artifacts.as_uri()]
    try:
        raise typer.Exit(run_group(command))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
@_command
def serve(
    model: Annotated[str, typer.Option(help="Registered model the nightly scoring uses (its @champion).")] = "xray",
    incoming: Annotated[
        Path | None, typer.Option(help="Folder scored on schedule (default $CNN_HOME/incoming).")
    ] = None,
    output: Annotated[str | None, typer.Option(help="Prediction file (.parquet/.csv) for scheduled scoring.")] = None,
    table: Annotated[str | None, typer.Option(help="SQLAlchemy URL#table (default: SQLite under CNN_HOME).")] = None,
    score_config: Annotated[Path | None, typer.Option(help="Scoring config YAML for the nightly scoring.")] = None,
    score_cron: Annotated[str, typer.Option(help="Cron of the scoring deployment (UTC).")] = "0 2 * * *",
    train_cron: Annotated[
        str, typer.Option(help="Cron of the training deployment (UTC); '' turns it off.")
    ] = "0 3 * * 0",
    dataset: Annotated[str | None, typer.Option(help="Dataset the scheduled training uses (default: MODEL).")] = None,
    config: Annotated[Path | None, typer.Option(help="Training config YAML for the scheduled training.")] = None,
    port: Annotated[int, typer.Option(help="Port of the local Prefect server (when PREFECT_API_URL is unset).")] = 4200,
    crash_after: CrashAfter = None,
) -> None:
    """Serve the scheduled `score` and `train` deployments until Ctrl-C (starts a local Prefect server if needed).
    Also sets up the automation that marks runs whose heartbeats stop as Crashed."""
    from flows import workspace
    from flows.serve import Schedules
    from flows.serve import serve as serve_deployments

    ws = workspace.current()
    folder = (incoming or ws.home / "incoming").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    schedules = Schedules(
        str(folder),
        ScoreConfig.load(score_config, model=model, output=output, table=table),
        score_cron,
        train_cron,
        dataset or model,
        TrainConfig.load(config) if config else None,
    )

    def started(api_url: str) -> None:
        ui_url = api_url.removesuffix("/api")
        console.print(
            f"serving deployments score/nightly ({score_cron}) over {folder}"
            + (f" and train/scheduled ({train_cron}) on dataset {schedules.dataset}" if train_cron else "")
            + f"\nPrefect API {api_url} (UI {ui_url}); Ctrl-C stops",
            highlight=False,
        )

    serve_deployments(ws, schedules, port, started, crash_after)
    console.print("stopped")


@app.command()
@_command
def automations(
    crash_after: CrashAfter = None,
) -> None:
    """Set up (or update) the Prefect automations the deployments rely on, on the server at PREFECT_API_URL."""
    from prefect.settings import get_current_settings

    from flows.automations import CRASH_DETECTION, crash_after_s, ensure_crash_detection

    if not get_current_settings().api.url:  # the environment or the active Prefect profile
        raise UserError("set PREFECT_API_URL to the Prefect server the deployments run on (automations live there)")
    automation_id = ensure_crash_detection(crash_after)
    console.print(
        f"automation {CRASH_DETECTION!r} ({automation_id}): Crashed after {crash_after or crash_after_s()} s "
        "without a heartbeat",
        highlight=False,
    )


@app.command("demo-data")
@_command
def demo_data(
    kind: Annotated[Literal["xray", "claims"], typer.Argument(help="Which demo set.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default $CNN_HOME/demo/KIND).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of images (default 600 each).")] = None,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same files.")] = 0,
    size: Annotated[int | None, typer.Option(help="Side of the generated images in pixels.")] = None,
) -> None:
    """Generate a deterministic synthetic dataset to try the pipeline on."""
    from cnn.data.demo import generate
    from flows import workspace

    made = generate(kind, out or workspace.current().home / "demo" / kind, n=n, seed=seed, size=size)
    console.print(
        f"wrote {made.images} {kind} images ({made.corrupt} deliberately corrupt files) to {made.root}\n"
        f"ingest it with: cnn ingest {made.source} --dataset {kind}",
        highlight=False,
    )


@app.command()
@_command
def demo() -> None:
    """Run the main job on generated data: xray demo set -> pipeline flow (ingest -> train -> register -> score)."""
    from flows import render, workspace
    from flows.demo import look_inside, make_data, run_demo

    home = workspace.current().home
    console.rule("[bold]1/4 generate the xray demo set and a fresh batch to score")
    data, batch = make_data(home)
    console.print(
        f"{data.images} images + {data.corrupt} corrupt files in {data.root}; batch in {batch.root}", highlight=False
    )
    console.rule("[bold]2/4 Prefect flow `pipeline`: ingest -> train, register, gate -> score with @champion")
    outcome = run_demo(home, data, batch)
    render.dataset_report(Path(outcome.pipeline.ingest.dataset_dir))
    render.training(outcome.pipeline.train)
    render.scoring(outcome.pipeline.score)
    console.rule("[bold]3/4 the same batch into CSV: nothing is scored twice in SQLite")
    render.scoring(outcome.csv_run)
    render.sample_predictions(outcome.parquet)
    console.rule("[bold]4/4 trust: the review queue, explanations of its top rows, the model card")
    inside = look_inside(home, outcome)
    render.review_queue(inside.review)
    render.explanations(inside.explained)
    render.model_card(inside.card)
    stem = outcome.parquet.stem
    console.print(
        f"prediction tables:\n  Parquet {outcome.parquet} (+ {stem}.rejects.parquet, {stem}.review.parquet, "
        f"overlays in {stem}.explanations/)\n  CSV     {outcome.csv} (+ {outcome.csv.stem}.rejects.csv, "
        f"{outcome.csv.stem}.review.csv)\n  SQLite  {outcome.table} (+ predictions_rejects, predictions_review)"
        f"\n\nworkspace: {home}\nMLflow store: {os.environ.get('MLFLOW_TRACKING_URI')}"
        f" (browse it with: cnn ui)\ntry: cnn card xray   cnn explain IMAGE --model xray --out DIR\n"
        f"     cnn augment --dataset xray --policy xray --preview {home / 'xray-preview.png'}\n"
        f"     cnn serve   (nightly scoring of {home / 'incoming'})",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    from flows.processes import stop_on_sigterm

    stop_on_sigterm()
    app()


if __name__ == "__main__":
    sys.exit(main())

"""The `cnn` command line: parse arguments into typed configs, call one flow entry point, render its typed result.

It orchestrates nothing. Every command goes through `_command`, which configures the workspace once (before
Prefect or MLflow are imported: both read their settings when they load) and turns user errors into one line
and exit code 2. Defaults shown in `--help` come from the configs themselves, so they cannot drift.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

import cnn
from cnn.choices import Backend, DemoKind, Explain, Precision, Resize
from cnn.config import FlowConfig, IngestOptions, ScoreConfig, TrainConfig
from cnn.errors import UserError
from cnn.io import storage
from flows.boundary import command as _command
from flows.faults import note_place
from flows.review_cli import review_app
from flows.tables_cli import tables_app

app = typer.Typer(
    name="cnn",
    help="Batch image classification: ingest and augment images, train CNNs, register and score them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags show as flags, choices as {a|b}
)
console = Console(soft_wrap=True)


def _opt(config: type[FlowConfig], field: str, *flags: str, **options: Any) -> Any:
    """A typer option described by the config field it sets: its help is the field's description and default, so the
    command line and the config (and the documentation built from both) can never say two things."""
    return typer.Option(*flags, help=config.described(field) + ".", **options)


def _on_off(field: str) -> str:
    """The --FIELD/--no-FIELD flags of a boolean config field."""
    flag = field.replace("_", "-")
    return f"--{flag}/--no-{flag}"


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
INGEST, TRAIN, SCORE = IngestOptions, TrainConfig, ScoreConfig  # the configs the options set


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
    image_size: Annotated[int | None, _opt(INGEST, "image_size")] = None,
    channels: Annotated[Literal["1", "3"] | None, _opt(INGEST, "channels")] = None,
    resize: Annotated[Resize | None, _opt(INGEST, "resize")] = None,
    val_fraction: Annotated[float | None, _opt(INGEST, "val_fraction")] = None,
    test_fraction: Annotated[float | None, _opt(INGEST, "test_fraction")] = None,
    group_column: Annotated[str | None, _opt(INGEST, "group_column")] = None,
    seed: Annotated[int | None, _opt(INGEST, "seed")] = None,
    decode_workers: Annotated[int | None, _opt(INGEST, "decode_workers")] = None,
    decode_time_limit: Annotated[float | None, _opt(INGEST, "decode_time_limit_s")] = None,
    max_file_mb: Annotated[float | None, _opt(INGEST, "max_file_mb")] = None,
    add: Annotated[bool | None, _opt(INGEST, "add", "--add/--replace")] = None,
    cluster: Annotated[str | None, _opt(INGEST, "cluster")] = None,
    dask_workers: Annotated[int | None, _opt(INGEST, "dask_workers")] = None,
    files_per_part: Annotated[int | None, _opt(INGEST, "files_per_part")] = None,
    allow_outside: Annotated[bool | None, _opt(INGEST, "allow_outside", _on_off("allow_outside"))] = None,
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
        allow_outside=allow_outside,
    )
    options.fractions()
    workspace.current().dataset(dataset)
    source = storage.local_path(source)
    storage.refuse_credentials(source)  # before the flow run records its parameters
    if not storage.is_url(source) and not Path(source).expanduser().exists():
        raise UserError(f"source not found: {source}")
    outcome = ingest_flow(source=source, dataset=dataset, options=options)
    render.dataset_report(Path(outcome.dataset_dir))


@app.command()
@_command
def augment(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="An ingested dataset.")],
    policy: Annotated[str, typer.Option(help=f"{TRAIN.model_fields['policy'].description}.")],
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
    model: Annotated[str | None, _opt(TRAIN, "model")] = None,
    epochs: Annotated[int | None, _opt(TRAIN, "epochs")] = None,
    batch_size: Annotated[int | None, _opt(TRAIN, "batch_size")] = None,
    lr: Annotated[float | None, _opt(TRAIN, "lr")] = None,
    policy: Annotated[str | None, _opt(TRAIN, "policy")] = None,
    device: Annotated[str | None, _opt(TRAIN, "device")] = None,
    max_minutes: Annotated[float | None, _opt(TRAIN, "max_minutes")] = None,
    weights: Annotated[str | None, _opt(TRAIN, "weights")] = None,
    precision: Annotated[Precision | None, _opt(TRAIN, "precision")] = None,
    download_weights: Annotated[bool | None, _opt(TRAIN, "download_weights", _on_off("download_weights"))] = None,
    register_as: Annotated[str | None, _opt(TRAIN, "register_as")] = None,
    gate_min_score: Annotated[float | None, _opt(TRAIN, "gate_min_score")] = None,
    gate_confidence: Annotated[float | None, _opt(TRAIN, "gate_confidence")] = None,
    replace_task: Annotated[bool | None, _opt(TRAIN, "replace_task", _on_off("replace_task"))] = None,
    operating_point: Annotated[list[str] | None, _opt(TRAIN, "operating_points", "--operating-point")] = None,
    gate_operating_points: Annotated[
        bool | None, _opt(TRAIN, "gate_operating_points", _on_off("gate_operating_points"))
    ] = None,
    intended_use: Annotated[str | None, _opt(TRAIN, "intended_use")] = None,
    limitations: Annotated[str | None, _opt(TRAIN, "limitations")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the latest interrupted run of this model.")
    ] = False,
    nproc_per_node: Annotated[int | None, _opt(TRAIN, "nproc_per_node")] = None,
    nnodes: Annotated[int | None, _opt(TRAIN, "nnodes")] = None,
    node_rank: Annotated[int | None, _opt(TRAIN, "node_rank")] = None,
    master_addr: Annotated[str | None, _opt(TRAIN, "master_addr")] = None,
    master_port: Annotated[int | None, _opt(TRAIN, "master_port")] = None,
    reviews: Annotated[
        str | None,
        typer.Option(
            help="A prediction table (as `cnn score` named it) whose reviewers' answers in Label Studio are pulled "
            "and added to the dataset first."
        ),
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
    render.training(run_training(dataset, cfg, resume, reviews))


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
    model: Annotated[str | None, _opt(SCORE, "model")] = None,
    config: ConfigFile = None,
    output: Annotated[str | None, _opt(SCORE, "output")] = None,
    table: Annotated[str | None, _opt(SCORE, "table")] = None,
    batch_size: Annotated[int | None, _opt(SCORE, "batch_size")] = None,
    device: Annotated[str | None, _opt(SCORE, "device")] = None,
    top_k: Annotated[int | None, _opt(SCORE, "top_k")] = None,
    review_below: Annotated[float | None, _opt(SCORE, "review_below")] = None,
    decode_workers: Annotated[int | None, _opt(SCORE, "decode_workers")] = None,
    decode_time_limit: Annotated[float | None, _opt(SCORE, "decode_time_limit_s")] = None,
    shard_size: Annotated[int | None, _opt(SCORE, "shard_size")] = None,
    max_attempts: Annotated[int | None, _opt(SCORE, "max_attempts")] = None,
    partition_by: Annotated[str | None, _opt(SCORE, "partition_by")] = None,
    pseudonymize: Annotated[list[str] | None, _opt(SCORE, "pseudonymize")] = None,
    rescore: Annotated[bool | None, _opt(SCORE, "rescore", _on_off("rescore"))] = None,
    verify_content: Annotated[bool | None, _opt(SCORE, "verify_content", _on_off("verify_content"))] = None,
    explain: Annotated[Explain | None, _opt(SCORE, "explain")] = None,
    review_flips: Annotated[bool | None, _opt(SCORE, "review_flips", _on_off("review_flips"))] = None,
    review_margin: Annotated[float | None, _opt(SCORE, "review_margin")] = None,
    review_push: Annotated[bool | None, _opt(SCORE, "review_push", _on_off("review_push"))] = None,
    embeddings: Annotated[bool | None, _opt(SCORE, "embeddings", _on_off("embeddings"))] = None,
    similar_cases: Annotated[bool | None, _opt(SCORE, "similar", _on_off("similar"))] = None,
    drift: Annotated[bool | None, _opt(SCORE, "drift", _on_off("drift"))] = None,
    fail_on_drift: Annotated[bool | None, _opt(SCORE, "fail_on_drift", _on_off("fail_on_drift"))] = None,
    cluster: Annotated[str | None, _opt(SCORE, "cluster")] = None,
    dask_workers: Annotated[int | None, _opt(SCORE, "dask_workers")] = None,
    precision: Annotated[Precision | None, _opt(SCORE, "precision")] = None,
    backend: Annotated[Backend | None, _opt(SCORE, "backend")] = None,
    compile: Annotated[bool | None, _opt(SCORE, "compile", _on_off("compile"))] = None,
    allow_outside: Annotated[bool | None, _opt(SCORE, "allow_outside", _on_off("allow_outside"))] = None,
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
        verify_content=verify_content,
        explain=explain,
        review_flips=review_flips,
        review_margin=review_margin,
        review_push=review_push,
        embeddings=embeddings,
        similar=similar_cases,
        drift=drift,
        fail_on_drift=fail_on_drift,
        cluster=cluster,
        dask_workers=dask_workers,
        precision=precision,
        backend=backend,
        compile=compile,
        allow_outside=allow_outside,
    )
    for url in (source, cfg.output or ""):  # before the flow run records its parameters
        storage.refuse_credentials(storage.local_path(url))
    if cfg.output and not storage.is_url(cfg.output):
        note_place("--output", storage.local_path(cfg.output))  # a full disk's message shows its room
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
    kind: Annotated[DemoKind, typer.Argument(help="Which demo set.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default $CNN_HOME/demo/KIND).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of images (default 600; garments 20,000).")] = None,
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


app.add_typer(tables_app, name="tables")
app.add_typer(review_app, name="review")


def main() -> None:
    """Console-script entry point."""
    from flows.processes import exit_without_teardown, guard

    guard()
    try:
        app()
    except SystemExit as done:  # typer ends every command with one
        exit_without_teardown(done.code)
    exit_without_teardown(0)


if __name__ == "__main__":
    sys.exit(main())

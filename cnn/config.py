"""The typed configs of the flows: one pydantic model per flow, loadable from YAML, overridable from the command
line, logged with every run. Unknown keys are rejected.

Each field's `description` is the one text that describes it: the command line's `--help`, the documentation's
config reference and the run's logged config all show it (tests/flows/test_cli.py checks the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cnn.choices import Backend, Explain, Imbalance, Metric, Optimizer, Precision, Resize, Schedule
from cnn.errors import UserError
from cnn.io.decode import DecodeSpec
from cnn.limits import DEFAULT_TIME_LIMIT_S, MAX_FILE_MB
from cnn.metrics.operating_points import PointSpec


class FlowConfig(BaseModel):
    """Shared behaviour: YAML in, overrides on top, a readable error for every bad key or value."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    kind: ClassVar[str] = "config"

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Self:
        """Read YAML (if given), then apply the overrides that are not None."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise UserError(f"config file not found: {path}")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise UserError(f"config {path} is not valid YAML: {exc}") from None
            if not isinstance(loaded, dict):
                raise UserError(f"config {path} must be a mapping of option: value")
            data.update(loaded)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            raise UserError(f"invalid {cls.kind}: {describe_validation_error(exc)}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, str]:
        """Flattened key -> string, for MLflow params."""
        out: dict[str, str] = {}
        for key, value in self.model_dump(mode="json").items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": str(v) for k, v in value.items()})
            else:
                out[key] = str(value)
        return out

    @classmethod
    def described(cls, field: str) -> str:
        """The field's description with its default: the help of the option that sets it."""
        info = cls.model_fields[field]
        if info.is_required():
            return str(info.description)
        default = info.get_default(call_default_factory=True)
        shown = "none" if default is None or default == [] else default
        return f"{info.description} (default: {shown})"


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line: `field: problem; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of the data that go to validation and test; the rest trains."""

    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        for name, value in (("val", self.val), ("test", self.test)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"--{name}-fraction must be in [0, 1), not {value}")
        if self.val + self.test >= 1.0:
            raise UserError("--val-fraction plus --test-fraction must leave some data to train on")

    def targets(self, allowed: tuple[str, ...]) -> dict[str, float]:
        """Share of each allowed split, renormalised over what is allowed."""
        shares = {"val": self.val, "test": self.test}
        out = {s: shares[s] for s in allowed if s != "train"}
        out["train"] = 1.0 - sum(out.values())
        return {s: out[s] for s in allowed}


ALLOW_OUTSIDE = (  # the one description of --allow-outside, which ingest and scoring both take
    "Read links that lead out of the source, and manifest or review-table rows naming files outside the table's "
    "folder (refused by default: a link or an edited table must not pull in other files)"
)


class ClusterConfig(FlowConfig):
    """The options of a flow whose tasks can fan out to Dask: an existing scheduler, or a local cluster."""

    cluster: str | None = Field(None, description="Dask scheduler address (tcp://host:8786): the tasks fan out to it")
    dask_workers: int = Field(0, ge=0, description="Fan the tasks out to a local Dask cluster of N processes; 0 = none")

    @property
    def fan_out(self) -> bool:
        return bool(self.cluster or self.dask_workers)


class IngestOptions(ClusterConfig):
    """How a source becomes a dataset (the ingest flow's config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = "ingest config"

    image_size: int = Field(224, ge=8, le=4096, description="Side of the square cached images, in pixels")
    channels: Literal[1, 3] = Field(3, description="1 (grayscale) or 3 (RGB)")
    resize: Resize = Field("pad", description="pad (letterbox, keeps the whole image) or crop (the centre)")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of images for validation")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of images for test")
    group_column: str = Field("group", description="Manifest column holding the patient or claim id")
    group_tag: str | None = Field(
        "PatientID",
        description="DICOM tag that groups files (one patient never spans two splits) where the source names no "
        "group; stored only as a keyed pseudonym; null turns it off",
    )
    seed: int = Field(0, description="Seed of the split draw")
    decode_workers: int = Field(0, ge=0, description="Decoding processes (0 = all cores)")
    max_file_mb: float = Field(
        float(MAX_FILE_MB),
        gt=0,
        description="Reject files larger than this many MiB before reading them; models trained on the dataset carry "
        "the limit",
    )
    decode_time_limit_s: float = Field(DEFAULT_TIME_LIMIT_S, gt=0, description="Seconds one file may take to decode")
    add: bool = Field(
        False,
        description="Add the source's files to the dataset instead of replacing its file list (a filled-in review "
        "table always adds)",
    )
    files_per_part: int = Field(
        5000, ge=1, description="Files per decode task when the decoding fans out to Dask (each writes one shard)"
    )
    allow_outside: bool = Field(
        False,
        description=ALLOW_OUTSIDE,
    )

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    def decode_spec(self) -> DecodeSpec:
        return DecodeSpec(
            channels=self.channels, size=self.image_size, resize=self.resize, max_file_bytes=self.max_file_bytes
        )

    def fractions(self) -> SplitFractions:
        return SplitFractions(val=self.val_fraction, test=self.test_fraction)


class TrainConfig(FlowConfig):
    """Everything that decides a training run."""

    kind: ClassVar[str] = "training config"

    @property
    def batch(self) -> int:
        """The batch size, once the recipe decided it (cnn.model.train.resolved_config)."""
        if self.batch_size is None:
            raise RuntimeError("the batch size is decided by resolved_config() before training")
        return self.batch_size

    @property
    def peak_lr(self) -> float:
        """The peak learning rate, once the recipe decided it (cnn.model.train.resolved_config)."""
        if self.lr is None:
            raise RuntimeError("the learning rate is decided by resolved_config() before training")
        return self.lr

    def for_sharing(self) -> TrainConfig:
        """The config as MLflow shows it: local files (weights, policy) by their file name, never a path."""
        local = {key: getattr(self, key) for key in ("weights", "policy")}
        return self.model_copy(
            update={key: Path(value).name for key, value in local.items() if value and ("/" in value or "\\" in value)}
        )

    model: str = Field(
        "auto",
        description="Model name (see the model registry: cnn.model.networks); auto: small_resnet for images of at most "
        "32 px with at least 4,096 training images, else small_cnn (cnn.model.recipe)",
    )
    model_options: dict[str, Any] = Field(default_factory=dict, description="Extra arguments of the model builder")
    weights: str | None = Field(
        None,
        description="Pretrained weights: a local state_dict file, or imagenet (torchvision's published weights for "
        "the model, from torch's cache; see download_weights)",
    )
    download_weights: bool = Field(
        False, description="Let --weights imagenet download into torch's cache where it is missing"
    )
    freeze_epochs: int = Field(0, ge=0, description="Train only the head for the first N epochs")
    epochs: int = Field(10, ge=1, le=10_000, description="Number of epochs (under a time budget: at most)")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Images per batch; unset: 128 for images of at most 32 px with at least 4,096 training images, "
        "else 32 (cnn.model.recipe)",
    )
    lr: float | None = Field(None, gt=0, description="Peak learning rate; unset: 3e-3 x sqrt(batch size / 32)")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay")
    optimizer: Optimizer = Field("adamw", description="adamw or sgd (Nesterov momentum)")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of sgd")
    schedule: Schedule = Field("cosine", description="cosine, onecycle or constant, after the warm-up")
    warmup_epochs: float = Field(1.0, ge=0, description="Epochs of linear learning-rate warm-up")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy")
    ema: float | None = Field(
        0.999, ge=0, lt=1, description="Decay of a moving average of the weights, validated and saved; null = off"
    )
    imbalance: Imbalance = Field(
        "class_weights", description="none, class_weights (weighted loss) or sampler (weighted sampling)"
    )
    policy: str = Field(
        "auto",
        description="Augmentation preset (none, xray, photo, shift, light, auto) or albumentations YAML/JSON file; "
        "auto: none under 4,096 training images, else light (flips, shifts) for RGB and shift (no flips) for "
        "grayscale (cnn.model.recipe)",
    )
    monitor: Metric = Field("macro_f1", description="Validation metric that picks the best epoch")
    patience: int = Field(5, ge=0, description="Early stopping after N epochs without improvement; 0 = off")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm at this; null = off")
    max_minutes: float | None = Field(
        None, gt=0, description="Time budget: epochs and schedule are planned to end inside it"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    amp: bool = Field(True, description="Mixed precision on CUDA (bf16 where supported, else fp16 + grad scaler)")
    precision: Precision = Field(
        "auto", description="CPU training: auto (bf16 where its steps run faster here), fp32 or bf16"
    )
    channels_last: bool = Field(True, description="Train in the channels_last memory layout")
    compile: bool = Field(False, description="torch.compile the model for training")
    loader_workers: int | None = Field(
        None, ge=0, description="DataLoader workers; null = 2 when augmenting images over 64 px, else 0 (in process)"
    )
    seed: int = Field(0, description="Seed of the run (initialisation, shuffling, augmentation)")
    nproc_per_node: int = Field(1, ge=1, description="DDP processes on this node (torchrun)")
    nnodes: int = Field(1, ge=1, description="Nodes in the DDP job")
    node_rank: int = Field(0, ge=0, description="This node's rank (0 tracks, registers and gates)")
    master_addr: str = Field("127.0.0.1", description="Address of node 0 for the rendezvous")
    master_port: int = Field(29500, ge=1, le=65535, description="Port of node 0 for the rendezvous")
    register_as: str | None = Field(None, description="Registered model name (default: the dataset name)")
    gate_metric: Metric = Field("macro_f1", description="Metric the promotion gate compares versions on")
    min_improvement: float = Field(0.0, ge=0, description="Margin the new version must beat the champion by")
    gate_min_score: float | None = Field(None, ge=0, le=1, description="Never crown a version scoring below this floor")
    gate_confidence: float = Field(0.95, ge=0.5, lt=1, description="Confidence the paired improvement test must reach")
    replace_task: bool = Field(
        False, description="Let a version with other classes or another dataset replace the champion"
    )
    operating_points: list[str] = Field(
        default_factory=list,
        description="CLASS:sensitivity>=0.95, CLASS:specificity>=0.9, CLASS:precision>=0.8 or CLASS:0.3 (a "
        "threshold); repeat for more, the first that fires decides. Chosen on validation, checked on test",
    )
    gate_operating_points: bool = Field(
        False, description="Crown only when every operating point holds on test (the interval's lower end)"
    )
    intended_use: str = Field("", description="The model card's intended use")
    limitations: str = Field("", description="The model card's known limitations")

    @field_validator("operating_points")
    @classmethod
    def _parse_points(cls, value: list[str]) -> list[str]:
        return [PointSpec.parse(v).describe() for v in value]

    def point_specs(self) -> list[PointSpec]:
        """The operating points as typed specs, in priority order."""
        return [PointSpec.parse(v) for v in self.operating_points]

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node * self.nnodes > 1


class ScoreConfig(ClusterConfig):
    """Everything that decides a scoring run (the source is the command's argument)."""

    kind: ClassVar[str] = "scoring config"

    model: str = Field(..., description="MODEL (= MODEL@champion), MODEL@alias or MODEL:version")
    output: str | None = Field(
        None,
        description="A folder or object-store prefix (s3://bucket/preds) of Delta tables: predictions, rejects, "
        "embeddings, review, duplicates, drift, one commit per shard; or a plain .parquet or .csv file (rejects, "
        "review queue and overlays beside it) that each run rewrites",
    )
    table: str | None = Field(
        None,
        description="SQLAlchemy URL#table, env:VARIABLE#table, secret:BLOCK#table, or default (CNN_PREDICTIONS_URL, "
        "else SQLite under CNN_HOME); without --output the default table",
    )
    batch_size: int = Field(64, ge=1, description="Images per forward pass")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    top_k: int = Field(3, ge=1, description="Ranked labels kept per image")
    review_below: float = Field(
        0.6, ge=0.0, le=1.0, description="Flag predictions whose confidence is below this (0 = off)"
    )
    decode_workers: int = Field(0, ge=0, description="Decoding processes of a single-process run (0 = all cores)")
    decode_time_limit_s: float = Field(DEFAULT_TIME_LIMIT_S, gt=0, description="Seconds one file may take to decode")
    shard_size: int = Field(
        0,
        ge=0,
        description="Files per shard (each shard commits on its own); 0: by the model's input size, 256 at 224 px "
        "and more for smaller images (about the same pixels per shard, at most 8192 files)",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Runs that try a file whose reject was transient (truncated, I/O error, time limit, worker died)",
    )
    rescore: bool = Field(
        False, description="Score every input again with this version (after a new champion); earlier rows are kept"
    )
    verify_content: bool = Field(
        False,
        description="Hash every input again instead of trusting an unchanged file's stat (size, times, inode) or an "
        "object's version: a periodic full check where timestamps cannot be trusted",
    )
    partition_by: list[str] = Field(
        default_factory=list,
        description="Partition the Delta predictions table of --output (a folder or prefix) by these columns: date "
        "(the UTC day scored), label, decision, model_name, model_version",
    )
    pseudonymize: list[str] = Field(
        default_factory=list,
        description="Carried id columns (and `path`) written as keyed pseudonyms (HMAC-SHA256 with "
        "CNN_PSEUDONYM_KEY or $CNN_HOME/pseudonym.key)",
    )
    embeddings: bool = Field(True, description="Keep each image's embedding in the embeddings side table")
    similar: bool = Field(
        True, description="Nearest training images (neighbour_label) and the reuse check (duplicate_of)"
    )
    drift: bool = Field(True, description="Compare the batch with the version's validation reference")
    fail_on_drift: bool = Field(False, description="Exit 3 when the batch drifted (the tables are written)")
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="False-alarm rate of the drift check per run")
    explain: Explain = Field(
        "review", description="Grad-CAM overlays beside the output for these rows: none, review or all"
    )
    review_flips: bool = Field(
        True, description="Review rows whose mirror image gets another label (models trained with flips)"
    )
    review_margin: float = Field(0.05, ge=0, le=1, description="Review rows this close to an operating point")
    review_push: bool = Field(
        True,
        description="Push the open review rows to Label Studio after publishing, where the worker's environment "
        "names one (CNN_LABEL_STUDIO_URL); a server that is down is tried again at the next run",
    )
    precision: Precision = Field(
        "auto", description="auto: bf16 where it agrees with fp32 and is faster here; fp32 or bf16"
    )
    backend: Backend = Field(
        "auto",
        description="torch, the ONNX export in onnxruntime or openvino, or auto: the fastest here (fp32, bf16, int8) "
        "that agrees with fp32",
    )
    compile: bool = Field(False, description="torch.compile the model")
    allow_outside: bool = Field(
        False,
        description=ALLOW_OUTSIDE,
    )

"""The typed configs of the flows: one pydantic model per flow, loadable from YAML, overridable from the
command line, logged with every run. Unknown keys are rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cnn.choices import Backend, Metric, Precision
from cnn.errors import UserError
from cnn.limits import DEFAULT_TIME_LIMIT_S
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


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line: `field: problem; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())


class ClusterConfig(FlowConfig):
    """The options of a flow whose tasks can fan out to Dask: an existing scheduler, or a local cluster."""

    cluster: str | None = Field(None, description="Dask scheduler address: the tasks fan out to it")
    dask_workers: int = Field(
        0, ge=0, description="fan the tasks out to a local Dask cluster of N workers; 0 = no Dask"
    )

    @property
    def fan_out(self) -> bool:
        return bool(self.cluster or self.dask_workers)


class TrainConfig(FlowConfig):
    """Everything that decides a training run."""

    kind: ClassVar[str] = "training config"

    def for_sharing(self) -> TrainConfig:
        """The config as MLflow shows it: local files (weights, policy) by their file name, never a path."""
        local = {key: getattr(self, key) for key in ("weights", "policy")}
        return self.model_copy(
            update={key: Path(value).name for key, value in local.items() if value and ("/" in value or "\\" in value)}
        )

    model: str = "small_cnn"
    model_options: dict[str, Any] = Field(default_factory=dict, description="extra arguments of the model builder")
    weights: str | None = Field(
        None, description="pretrained weights: a local file, or imagenet (torchvision's, from torch's cache)"
    )
    download_weights: bool = Field(
        False, description="let --weights imagenet download into torch's cache where it is missing"
    )
    freeze_epochs: int = Field(0, ge=0, description="train only the head for the first N epochs")
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema: float | None = Field(
        0.999, ge=0, lt=1, description="decay of a moving average of the weights, validated and saved; null = off"
    )
    imbalance: Literal["none", "class_weights", "sampler"] = "class_weights"
    policy: str = Field(
        "none",
        description="augmentation preset or albumentations YAML/JSON file; auto: light (flips, shifts) for RGB, "
        "shift (no flips) for grayscale",
    )
    monitor: Metric = "macro_f1"
    patience: int = Field(5, ge=0, description="early stopping after N epochs without improvement; 0 = off")
    grad_clip: float | None = Field(1.0, gt=0)
    max_minutes: float | None = Field(None, gt=0)
    device: str = "auto"
    amp: bool = Field(True, description="mixed precision on CUDA (bf16 where supported, else fp16 + grad scaler)")
    precision: Precision = Field(
        "auto", description="CPU training: auto (bf16 where its steps run faster here), fp32 or bf16"
    )
    channels_last: bool = True
    compile: bool = False
    loader_workers: int | None = Field(
        None, ge=0, description="DataLoader workers; None = 0 without augmentation, else 2"
    )
    seed: int = 0
    # distributed data parallel (torchrun): processes per node, nodes, this node, rendezvous
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)
    # registry and promotion gate (used by the flow, logged with the run)
    register_as: str | None = None
    gate_metric: Metric = "macro_f1"
    min_improvement: float = Field(0.0, ge=0, description="margin the new version must beat the champion by")
    gate_min_score: float | None = Field(None, ge=0, le=1, description="floor: below it a version never leads")
    gate_confidence: float = Field(0.95, ge=0.5, lt=1, description="confidence of the paired improvement test")
    replace_task: bool = Field(False, description="let a version with other classes or data replace the champion")
    # trust: operating points (chosen on validation, checked on test), the gate's use of them, the model card
    operating_points: list[str] = Field(
        default_factory=list,
        description="CLASS:sensitivity>=0.95, CLASS:specificity>=0.9, CLASS:precision>=0.8 or CLASS:0.3; "
        "the first that fires decides",
    )
    gate_operating_points: bool = Field(
        False, description="crown only when every operating point holds on the test split (interval's lower end)"
    )
    intended_use: str = Field("", description="the model card's intended use")
    limitations: str = Field("", description="the model card's known limitations")

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
        None, description="prediction file, .parquet or .csv (rejects beside it); a path or an s3://, gs://, az:// URL"
    )
    table: str | None = Field(
        None, description="SQLAlchemy URL#table, or `default` for CNN_PREDICTIONS_URL (else SQLite under CNN_HOME)"
    )
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    device: str = "auto"
    top_k: int = Field(3, ge=1, description="ranked labels kept per image")
    review_below: float = Field(0.6, ge=0.0, le=1.0, description="flag predictions whose confidence is below this")
    decode_workers: int = Field(0, ge=0, description="decoding processes of a single-process run; 0 = all cores")
    decode_time_limit_s: float = Field(DEFAULT_TIME_LIMIT_S, gt=0, description="seconds one file may take to decode")
    shard_size: int = Field(256, ge=1, description="files per shard; each shard commits on its own")
    max_attempts: int = Field(
        3, ge=1, description="runs that try a file whose reject was transient (truncated, I/O error, time limit)"
    )
    rescore: bool = Field(False, description="score every input again with this version, even those already scored")
    partition_by: list[str] = Field(
        default_factory=list,
        description="write --output as a Hive-partitioned Parquet table by these columns (date, label, decision, "
        "model_name, model_version)",
    )
    pseudonymize: list[str] = Field(
        default_factory=list, description="carried id columns (and `path`) written as keyed pseudonyms"
    )
    embeddings: bool = Field(True, description="keep each image's embedding in the embeddings side table")
    similar: bool = Field(
        True,
        description="nearest training images (neighbour_label) and the reuse check (duplicate_of); needs embeddings",
    )
    drift: bool = Field(True, description="compare the batch with the version's validation reference")
    fail_on_drift: bool = Field(False, description="fail the run (exit 3) when the batch drifted")
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="false-alarm rate of the drift check per run")
    explain: Literal["none", "review", "all"] = Field(
        "review", description="write Grad-CAM overlays for the rows needing review, all rows, or none"
    )
    review_flips: bool = Field(
        True, description="send a row for review when its mirror image gets another label (models trained with flips)"
    )
    review_margin: float = Field(
        0.05, ge=0, le=1, description="send a row for review when it is this close to an operating point"
    )
    precision: Precision = "auto"
    backend: Backend = Field(
        "auto", description="torch, the ONNX export in onnxruntime or openvino, or auto: the fastest that agrees"
    )
    compile: bool = False

"""The typed results of a scoring run: the pinned model version (`ModelRef`), how shards are scored
(`ScoringOptions`), what a shard held (`ShardResult`) and the run's summary."""

from __future__ import annotations

import functools
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cnn.config import ScoreConfig
from cnn.io.pool import default_workers
from cnn.metrics.drift import DriftSample

SPOOL = "objects"  # the run folder's copies of the objects the plan read (cnn.io.storage.fetch_objects)


@dataclass(frozen=True)
class ShardPlan:
    """The files still to score, cut into shards (saved as Parquet; shards read their rows from it)."""

    path: str
    shards: int
    files: int
    skipped: int  # these bytes at this path already have a current row in every sink
    id_columns: tuple[str, ...] = ()
    retried: int = 0  # files whose earlier reject was transient, tried again
    key: str = ""  # this plan's own id: a retried shard commits under the same transaction identifier

    def remove(self) -> None:
        """Delete the plan file once the run is published (it lists paths and image ids), and what is left of its
        copies of objects."""
        Path(self.path).unlink(missing_ok=True)
        shutil.rmtree(Path(self.path).parent / SPOOL, ignore_errors=True)

    def rows(self, shard: int) -> pd.DataFrame:
        """The files of one shard, with their image_id and duplicate mark."""
        files = self.frame()
        return files[files["shard"] == shard].drop(columns="shard").reset_index(drop=True)

    def frame(self) -> pd.DataFrame:
        """Every planned file (path, image_id, duplicate mark, shard, ...), read once per process."""
        return _plan_frame(self.path, self.key)


@functools.lru_cache(maxsize=1)
def _plan_frame(path: str, key: str) -> pd.DataFrame:
    """The plan's rows, read once per process and plan (`key` is the plan's own id: a new plan at the same path is
    read again); every shard used to read the whole file twice (its own rows, and the next shard's)."""
    return pd.read_parquet(path)


@dataclass(frozen=True)
class ModelRef:
    """The model version a scoring run pinned, used from start to end: where its files are, and how it runs."""

    name: str
    version: str
    run_id: str
    files: str = ""  # local folder with the version's weights and contract
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 | int8, as the precision and backend policies chose
    precision_reason: str = ""
    compile: bool = False
    backend: str = "torch"  # torch | onnxruntime | openvino (cnn.infer.backends)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def _default(field_name: str) -> Any:
    """ScoreConfig's default: the one home of the scoring defaults."""
    return ScoreConfig.model_fields[field_name].default


@dataclass(frozen=True)
class ScoringOptions:
    """How each shard is scored (defaults: ScoreConfig's)."""

    batch_size: int = _default("batch_size")
    top_k: int = _default("top_k")
    review_below: float = _default("review_below")
    decode_workers: int = _default("decode_workers")  # 0 = all cores
    flow_run_id: str = ""
    decode_time_limit_s: float = _default("decode_time_limit_s")
    review_flips: bool = _default("review_flips")
    review_margin: float = _default("review_margin")
    explain: str = _default("explain")  # none | review | all
    embeddings: bool = _default("embeddings")
    history_dir: str = ""  # where shards leave what they scored for the history (run folder); "" = nowhere
    explain_dir: str = ""  # where the overlays go ("" = nowhere)
    explain_base: str = ""  # the `explanation` column is relative to this folder ("" = absolute paths)
    decode_ahead: bool = False  # decode shard k+1 while shard k is in inference (shards run in order, one process)

    @classmethod
    def from_config(
        cls, config: ScoreConfig, flow_run_id: str, explain_dir: str = "", explain_base: str = ""
    ) -> ScoringOptions:
        """The options of a run; shards fanned out to Dask decode in the worker process (a daemon: one process)."""
        shared = {f.name: getattr(config, f.name) for f in fields(cls) if f.name in ScoreConfig.model_fields}
        workers = 1 if config.fan_out else config.decode_workers
        return cls(
            **{**shared, "decode_workers": workers},
            decode_ahead=not config.fan_out and decode_ahead_helps(config.device),
            flow_run_id=flow_run_id,
            explain_dir=explain_dir,
            explain_base=explain_base,
        )


@dataclass(frozen=True)
class ShardResult:
    """What one committed shard held."""

    files: int
    predicted: int
    rejected: int
    seconds: float
    needs_review: int
    labels: dict[str, int] = field(default_factory=dict)
    rejects_by_kind: dict[str, int] = field(default_factory=dict)
    compile_failed: bool = False
    drift: DriftSample | None = None
    copies: int = 0  # images that repeat a training image or one scored before
    decode_wait_s: float = 0.0  # of `seconds`, how long inference waited for decoded images


@dataclass(frozen=True)
class ScoringSummary:
    """A whole run: counts, where the tables are, and how it ran."""

    model: str
    precision: str  # fp32 | bf16 | fp16, and whether it ran compiled
    precision_reason: str  # why the policy chose it (with the measured bf16 agreement where there is one)
    files: int
    predicted: int
    rejected: int
    skipped: int
    needs_review: int
    seconds: float
    labels: dict[str, int]
    rejects_by_kind: dict[str, int]
    tables: list[str]
    retried: int = 0
    copies: int = 0
    drift: str = ""  # the drift check's verdict
    drifted: bool = False
    review_push: str = ""  # what the push to Label Studio did, or why it did not (empty: none configured)

    @property
    def images_per_s(self) -> float:
        return round(self.files / self.seconds, 1) if self.seconds > 0 else 0.0

    def rows(self) -> list[dict[str, object]]:
        """item/count rows, for the terminal table and the Prefect artifact."""
        rows: list[dict[str, object]] = [{"item": f"label {k}", "count": v} for k, v in sorted(self.labels.items())]
        rows += [{"item": f"rejected: {k}", "count": v} for k, v in sorted(self.rejects_by_kind.items())]
        rows += [
            {"item": "needs review", "count": self.needs_review},
            {"item": "already scored (skipped)", "count": self.skipped},
            {"item": "transient rejects tried again", "count": self.retried},
            {"item": "copies of earlier images", "count": self.copies},
            {"item": "images/s", "count": self.images_per_s},
        ]
        return rows


def decode_ahead_helps(device: str) -> bool:
    """Decoding the next shard during inference pays where inference leaves CPU cores free: on a GPU, or with more
    cores than torch's threads. Where both use every core it does not (0.95-1.00x on 2 cores, bench/score.py)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return True
    return default_workers() > torch.get_num_threads()


def summarise(
    results: Sequence[ShardResult], plan: ShardPlan, model: ModelRef, seconds: float, tables: list[str]
) -> ScoringSummary:
    """Combine the shards of a run into one summary."""
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for result in results:
        labels.update(result.labels)
        kinds.update(result.rejects_by_kind)
    precision = model.precision if model.backend == "torch" else f"{model.precision} on {model.backend}"
    if model.compile:
        failed = any(r.compile_failed for r in results)
        precision += ", eager (torch.compile failed, see the log)" if failed else ", compiled"
    return ScoringSummary(
        model=model.label,
        precision=precision,
        precision_reason=model.precision_reason,
        files=plan.files,
        predicted=sum(r.predicted for r in results),
        rejected=sum(r.rejected for r in results),
        skipped=plan.skipped,
        retried=plan.retried,
        needs_review=sum(r.needs_review for r in results),
        seconds=seconds,
        labels=dict(labels),
        rejects_by_kind=dict(kinds),
        tables=tables,
        copies=sum(r.copies for r in results),
    )


def merged_drift(results: Sequence[ShardResult]) -> DriftSample:
    """The run's drift sample: every shard's, together."""
    sample = DriftSample()
    for result in results:
        if result.drift is not None:
            sample = sample.merge(result.drift)
    return sample

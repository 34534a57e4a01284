"""A training run's folder, its one owner (`RunFolder` knows every file name in it), and what a run produced
(`FitResult`, saved as fit.json; one `EpochRecord` per epoch). Reading a run needs none of the training machinery,
so evaluation and scoring can load it without importing the engine.

Layout of a run folder:
  best.pt, last.pt        the best epoch's state_dict; the last epoch's checkpoint (resume)
  contract.json           the model's data contract (classes, input, normalisation, calibration, operating points)
  config.yaml             the training config
  fit.json                the FitResult: epochs, history, precision, budget
  calibration.json        temperature and operating points chosen on validation
  eval/                   metrics, intervals, reports and plots of the evaluated splits
  reference/              the version's reference (similar cases, reuse check, drift)
  model.onnx              the ONNX export
  model_card/             card.md, card.json
  mlflow_run_id, done     the tracking run's id; written when every step of the flow finished
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cnn.formats import migrated
from cnn.fsio import write_json_atomic
from cnn.model.budget import BudgetReport
from cnn.model.contract import ModelContract

Stopped = Literal["completed", "early_stopping", "time_budget"]
ONNX_FILE = "model.onnx"  # the ONNX export, in a run folder and beside a registered version
FIT_FORMAT = 2  # fit.json: 1 kept each epoch's validation metrics as flat val_* keys; 2 keeps them under `val`


@dataclass(frozen=True)
class RunFolder:
    """The files of one training run."""

    root: Path

    @property
    def weights(self) -> Path:
        return self.root / "best.pt"

    @property
    def checkpoint(self) -> Path:
        return self.root / "last.pt"

    @property
    def contract(self) -> Path:
        return self.root / "contract.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def fit(self) -> Path:
        return self.root / "fit.json"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def reference(self) -> Path:
        return self.root / "reference"

    @property
    def onnx(self) -> Path:
        return self.root / ONNX_FILE

    @property
    def card_dir(self) -> Path:
        return self.root / "model_card"

    @property
    def tracking_id(self) -> Path:
        return self.root / "mlflow_run_id"

    @property
    def done(self) -> Path:
        return self.root / "done"

    def model_files(self) -> dict[str, Path]:
        """The files a registered version's digests cover: weights, contract and (where exported) the ONNX model."""
        files = {"weights": self.weights, "contract": self.contract, "onnx": self.onnx}
        return {part: path for part, path in files.items() if path.is_file()}


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: the training loss and rate, the learning rate at its end, and the validation metrics."""

    epoch: int
    train_loss: float
    lr: float
    steps: int
    epoch_seconds: float
    train_images_per_s: float
    val: dict[str, float] = field(default_factory=dict)  # the headline metrics of the validation split

    def metrics(self) -> dict[str, float]:
        """Everything but the epoch number as flat metric names (`val_macro_f1`), for tracking and plots."""
        flat = {k: float(v) for k, v in asdict(self).items() if k not in ("epoch", "val")}
        return flat | {f"val_{k}": float(v) for k, v in self.val.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochRecord:
        """From `asdict`, or from the flat record of fit.json format 1 and checkpoints written before it."""
        if "val" in data:
            return cls(**data)
        val = {k.removeprefix("val_"): float(v) for k, v in data.items() if k.startswith("val_")}
        own = {k: v for k, v in data.items() if not k.startswith("val_")}
        return cls(int(own.pop("epoch")), **{**own, "steps": int(own["steps"])}, val=val)


@dataclass(frozen=True)
class FitResult:
    """What a training run produced; saved as fit.json beside contract.json."""

    run_dir: Path
    weights: Path  # best.pt: state_dict of the best epoch
    contract: ModelContract
    best_epoch: int
    best_score: float | None
    epochs_run: int
    stopped: Stopped
    history: list[EpochRecord] = field(default_factory=list)
    device: str = "cpu"
    world_size: int = 1
    precision: str = "fp32"  # what the training steps ran in, and why
    precision_reason: str = ""
    budget: BudgetReport | None = None  # how a --max-minutes budget was planned and spent

    def save(self) -> Path:
        """fit.json: everything but the contract (saved beside it as contract.json); the run's own files by their
        path inside the run folder, so the record holds no path of the host (and survives the folder moving)."""
        summary = {k: v for k, v in asdict(self).items() if k not in ("contract", "run_dir")}
        weights = Path(self.weights)
        summary["weights"] = str(weights.relative_to(self.run_dir) if weights.is_relative_to(self.run_dir) else weights)
        return write_json_atomic(RunFolder(self.run_dir).fit, {**summary, "format_version": FIT_FORMAT})

    @classmethod
    def load(cls, run_dir: str | Path) -> FitResult:
        """Read fit.json and contract.json of a run (the one reader of fit.json; format 1 is read as well)."""
        folder = RunFolder(Path(run_dir))
        data = migrated(json.loads(folder.fit.read_text(encoding="utf-8")), FIT_FORMAT, {1: _nested_val}, "fit.json")
        data.pop("format_version")
        data.pop("run_dir", None)  # written by earlier versions; the folder read is the run's folder
        weights = folder.root / data["weights"]  # relative inside the run folder (an absolute path stays as it is)
        data.update(run_dir=folder.root, weights=weights, contract=ModelContract.load(folder.contract))
        data["history"] = [EpochRecord.from_dict(h) for h in data.get("history", [])]
        if data.get("budget"):
            data["budget"] = BudgetReport(**data["budget"])
        return cls(**data)


def _nested_val(data: dict[str, Any]) -> dict[str, Any]:
    """fit.json format 1 -> 2: each epoch's validation metrics move from flat `val_*` keys into `val`."""
    return {**data, "history": [asdict(EpochRecord.from_dict(h)) for h in data.get("history", [])]}

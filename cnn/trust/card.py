"""The model card of a trained version (Mitchell et al., 2019): what it was trained on, how well it does with
intervals, how its probabilities are calibrated, where its operating points sit, what the promotion gate
decided, example explanations, and the intended use and limitations its training config states. Markdown for
people (the registry UI shows it as the version's description) and JSON for tools; built from the run folder
and the dataset, so it holds no path and no identifier (image ids are content hashes)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cnn.choices import SPLITS
from cnn.data.dataset import Dataset, usable_rows
from cnn.data.report import DatasetReport
from cnn.fsio import write_json_atomic, write_text_atomic
from cnn.metrics.calibration import Calibration
from cnn.metrics.classification import Interval
from cnn.metrics.operating_points import PointCheck
from cnn.model.contract import ModelContract
from cnn.model.run import RunFolder
from cnn.trust.evaluation import CalibrationResult


@dataclass(frozen=True)
class DataSummary:
    """The card's data section: digest, counts per class and split, groups, rejects, duplicates, reviewed."""

    dataset: str
    manifest_sha256: str
    ok: int
    rejected: int
    rejects_by_reason: dict[str, int]
    duplicate_sets: int
    duplicate_files: int
    groups: int
    splits: list[str]
    counts: dict[str, dict[str, int]]  # class -> split -> images
    reviewed: int
    reviewed_train: int


@dataclass(frozen=True)
class GateSummary:
    """What the promotion gate decided for the version, as the card shows it."""

    decision: str
    reason: str
    test: str = ""
    p_value: float | None = None


NOT_CALIBRATED = Calibration(1.0, False, 0.0, 0.0, None, None, 0.0, 0.0)


@dataclass
class ModelCard:
    """Everything the card shows; `to_markdown` renders it, `to_dict` is its JSON."""

    model: str
    version: str
    created: str
    architecture: str
    classes: list[str]
    input: str
    intended_use: str
    limitations: str
    data: DataSummary
    config: dict[str, Any]  # the training config as logged (TrainConfig.model_dump)
    metrics: dict[str, float]
    per_class: dict[str, dict[str, Interval]]  # class -> metric -> value with its interval
    calibration: Calibration
    operating_points: list[PointCheck]  # each point on the test split
    gate: GateSummary
    explanations: list[str] = field(default_factory=list)  # artifact paths of the run (no file paths)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["operating_points"] = [c.to_dict() for c in self.operating_points]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """From `to_dict` (card.json)."""
        typed = {
            "data": DataSummary(**data["data"]),
            "calibration": Calibration(**data["calibration"]),
            "per_class": {c: {m: Interval(**i) for m, i in per.items()} for c, per in data["per_class"].items()},
            "operating_points": [PointCheck.from_dict(c) for c in data["operating_points"]],
            "gate": GateSummary(**data["gate"]),
        }
        return cls(**{**data, **typed})

    def save(self, folder: Path) -> tuple[Path, Path]:
        """card.md and card.json, written atomically."""
        return (
            write_text_atomic(Path(folder) / "card.md", self.to_markdown()),
            write_json_atomic(Path(folder) / "card.json", self.to_dict()),
        )

    def to_markdown(self, brief: bool = False) -> str:
        """The card as Markdown; `brief` leaves out the training config (the registry's description field holds
        at most 5,000 characters)."""
        data, cal = self.data, self.calibration
        lines = [
            f"# Model card: {self.model} v{self.version}",
            "",
            f"{self.architecture}, {len(self.classes)} classes ({', '.join(self.classes)}), input {self.input}; "
            f"card written {self.created}.",
            "",
            "## Intended use",
            self.intended_use or "_Not stated: set `intended_use` in the training config._",
            "",
            "## Limitations",
            self.limitations or "_Not stated: set `limitations` in the training config._",
            "",
            "## Data",
            f"Dataset `{data.dataset}`, manifest sha256 `{data.manifest_sha256[:16]}…`: {data.ok} usable "
            f"images in {data.groups} groups, {data.rejected} files rejected, {data.duplicate_files} "
            f"duplicate files ({data.duplicate_sets} images seen more than once), "
            f"{data.reviewed_train} reviewer-labelled images in training ({data.reviewed} in all).",
            "",
            _table(
                ["class", *data.splits],
                [[c, *[data.counts.get(c, {}).get(s, 0) for s in data.splits]] for c in self.classes],
            ),
        ]
        if data.rejects_by_reason:
            lines += ["", "Rejects: " + "; ".join(f"{n} {r}" for r, n in data.rejects_by_reason.items())]
        lines += ["", "## Test metrics (bootstrap 95% intervals)", ""]
        lines.append(", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()))
        lines.append("")
        metrics = ["precision", "recall", "specificity", "f1"]
        lines.append(
            _table(
                ["class", *metrics],
                [[c, *[_interval(self.per_class.get(c, {}).get(m)) for m in metrics]] for c in self.classes],
            )
        )
        lines += ["", "## Calibration (temperature scaling, fitted on validation)", ""]
        lines.append(
            f"Temperature {cal.temperature:.3f}{'' if cal.applied else ' (not applied)'}. ECE on validation "
            f"{cal.val_ece_before:.4f} → {cal.val_ece_after:.4f}; on test "
            f"{_number(cal.test_ece_before)} → {_number(cal.test_ece_after)}." + (f" {cal.note}" if cal.note else "")
        )
        lines += ["", "## Operating points (chosen on validation, checked on test)", ""]
        if self.operating_points:
            rows = []
            for check in self.operating_points:
                point = check.point
                target = point.target if point.target == "threshold" else f"{point.target} ≥ {point.value:g}"
                verdict = {True: "holds", False: "**does not hold**", None: "-"}[check.holds]
                intervals = [_interval(getattr(check, m)) for m in ("sensitivity", "specificity", "precision")]
                rows.append([point.class_name, target, f"{point.threshold:.4f}", *intervals, verdict])
            lines.append(
                _table(["class", "target", "threshold", "sensitivity", "specificity", "precision", "on test"], rows)
            )
        else:
            lines.append("None: `decision` is the most probable class (set `operating_points` to choose thresholds).")
        gate = self.gate
        lines += ["", "## Promotion gate", ""]
        lines.append(f"**@{gate.decision}**: {gate.reason}")
        if gate.test:
            lines.append(f"\nTest: {gate.test}, p = {gate.p_value}.")
        if self.explanations:
            lines += ["", "## Example explanations", ""]
            lines += [f"- run artifact `{name}`" for name in self.explanations]
        if brief:
            lines += ["", "_The full card, with the training config: run artifact `model_card/card.md`._", ""]
            return "\n".join(lines)
        lines += ["", "## Training config", "", "```yaml"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in self.config.items()]
        lines += ["```", ""]
        return "\n".join(lines)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _interval(value: Interval | None) -> str:
    if value is None or value.value != value.value:  # NaN: undefined
        return "n/a"
    return f"{value.value:.3f} [{value.low:.3f}, {value.high:.3f}]"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def data_summary(dataset: Dataset) -> DataSummary:
    """The card's data section: digest, counts per class and split, groups, rejects, duplicates, reviewed."""
    report = DatasetReport.load(dataset.root) if (dataset.root / "report.json").is_file() else None
    manifest = dataset.manifest()
    ok = usable_rows(manifest)
    counts: dict[str, dict[str, int]] = {}
    for (label, split), n in ok.groupby(["label", "split"]).size().items():
        counts.setdefault(str(label), {})[str(split)] = int(n)
    reviewed = ok["reviewed"].fillna(False).astype(bool)
    groups = ok["group"].fillna(ok["image_id"]).nunique()  # an image without a group is its own
    return DataSummary(
        dataset=dataset.name,
        manifest_sha256=hashlib.sha256(dataset.manifest_path.read_bytes()).hexdigest(),
        ok=len(ok),
        rejected=len(manifest) - len(ok),
        rejects_by_reason=report.rejects_by_reason if report else {},
        duplicate_sets=report.duplicate_sets if report else 0,
        duplicate_files=report.duplicate_files if report else 0,
        groups=int(groups),
        splits=[s for s in SPLITS if (ok["split"] == s).any()],
        counts=counts,
        reviewed=int(reviewed.sum()),
        reviewed_train=int((reviewed & (ok["split"] == "train")).sum()),
    )


def build_card(
    run_dir: Path,
    dataset: Dataset,
    model: str,
    version: str,
    config: dict[str, Any],
    gate: GateSummary,
    explanations: list[str],
) -> ModelCard:
    """The card of a trained version from its run folder (contract, calibration.json, eval/) and its dataset."""
    folder = RunFolder(run_dir)
    contract = ModelContract.load(folder.contract)
    eval_dir = folder.eval_dir
    metrics = (
        json.loads((eval_dir / "test_metrics.json").read_text()) if (eval_dir / "test_metrics.json").is_file() else {}
    )
    headline = {
        k: float(metrics[k])
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "ece")
        if metrics.get(k) is not None
    }
    intervals_file, points_file = eval_dir / "test_intervals.json", eval_dir / "test_operating_points.json"
    calibration = CalibrationResult.load(run_dir)
    intervals = json.loads(intervals_file.read_text()) if intervals_file.is_file() else {}
    checks = json.loads(points_file.read_text()) if points_file.is_file() else []
    return ModelCard(
        model=model,
        version=version,
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        architecture=contract.model,
        classes=list(contract.classes),
        input=f"{contract.image_size}x{contract.image_size}, {contract.channels} channel(s), {contract.resize}",
        intended_use=str(config.get("intended_use") or ""),
        limitations=str(config.get("limitations") or ""),
        data=data_summary(dataset),
        config={**config, "weights": Path(config["weights"]).name if config.get("weights") else None},
        metrics=headline,
        per_class={c: {m: Interval(**i) for m, i in per.items()} for c, per in intervals.items()},
        calibration=calibration.calibration if calibration else NOT_CALIBRATED,
        operating_points=[PointCheck.from_dict(c) for c in checks],
        gate=gate,
        explanations=explanations,
    )

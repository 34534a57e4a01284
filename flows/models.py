"""Registered models for scoring: pin MODEL[@alias|:version] to one version, fetch its files, pick precision."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnn.contract import ModelContract
from cnn.data import load_split
from cnn.errors import UserError
from cnn.inference import Predictor
from cnn.scoring import bf16_agreement, cpu_bf16_available
from flows import workspace

BF16_MIN_AGREEMENT = 0.995
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|:(?P<version>\d+))?$")


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """MODEL, MODEL@alias or MODEL:version -> (name, alias, version); a bare name means @champion."""
    match = _SPEC.match(spec)
    if not match:
        raise UserError(f"invalid model {spec!r}: use MODEL, MODEL@alias or MODEL:version")
    alias, version = match["alias"], match["version"]
    return match["name"], (alias or ("champion" if version is None else None)), version


def resolve(spec: str, device: str, precision: str = "auto", compile: bool = False) -> dict[str, Any]:
    """The concrete version, its local files, and the inference precision (and compilation) for this run."""
    name, alias, version = parse_spec(spec)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise UserError(f"model {spec!r} not found in the registry at {mlflow.get_tracking_uri()}; "
                        "train one with `cnn train` or check the name, alias and version") from None
    target = workspace.current().home / "models" / name / str(mv.version)
    if not (target / "MLmodel").is_file():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(target))
    pinned = {"name": name, "version": str(mv.version), "run_id": mv.run_id or "", "dir": str(target),
              "device": device, "precision": "fp32", "compile": compile}
    pinned["precision"] = _choose_precision(client, pinned, precision)
    return pinned


def load_predictor(pinned: dict[str, Any]) -> Predictor:
    """The pinned version as a Predictor: channels_last, autocast on GPU, bf16 on CPU when it was approved."""
    return _cached_predictor(pinned["dir"], pinned["device"], pinned["precision"], pinned["compile"])


@functools.lru_cache(maxsize=4)
def _cached_predictor(model_dir: str, device: str, precision: str, compile: bool) -> Predictor:
    # Shards run one after another in this process (or on the same Dask worker): build the network, load
    # the weights and fold batch norm once per version rather than once per shard.
    weights, contract = _artifact_paths(Path(model_dir))
    predictor = Predictor.load(weights, contract, device, channels_last=True, fuse=True)
    if predictor.device.type == "cpu" and precision == "bf16":
        import torch

        predictor = predictor.with_precision(torch.bfloat16)
    return predictor.compiled() if compile else predictor


def _artifact_paths(model_dir: Path) -> tuple[Path, Path]:
    """Where the pyfunc keeps its weights and contract, as its MLmodel file says."""
    import yaml

    artifacts = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    return model_dir / artifacts["weights"]["path"], model_dir / artifacts["contract"]["path"]


def _choose_precision(client: MlflowClient, pinned: dict[str, Any], requested: str) -> str:
    """bf16 on CPUs with native bf16, only when its labels agree with fp32 on the model's validation
    split (>= 99.5% top-1). The check runs once per version and is recorded as version tags."""
    if requested not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision must be auto, fp32 or bf16, not {requested!r}")
    predictor = load_predictor({**pinned, "precision": "fp32"})
    if predictor.device.type != "cpu":
        return "amp"
    if requested == "fp32" or (requested == "auto" and not cpu_bf16_available()):
        return "fp32"
    tags = client.get_model_version(pinned["name"], pinned["version"]).tags
    if "cpu_bf16.agreement" in tags:
        agreement = float(tags["cpu_bf16.agreement"])
    else:
        images = _validation_images(predictor.contract)
        if images is None:
            return "fp32"
        agreement = bf16_agreement(predictor, images)
        client.set_model_version_tag(pinned["name"], pinned["version"], "cpu_bf16.agreement", f"{agreement:.6f}")
        client.set_model_version_tag(pinned["name"], pinned["version"], "cpu_bf16.checked_on", f"{len(images)} val images")
    approved = agreement >= BF16_MIN_AGREEMENT
    client.set_model_version_tag(pinned["name"], pinned["version"], "cpu_bf16.enabled", str(approved).lower())
    return "bf16" if approved else "fp32"


def _validation_images(contract: ModelContract) -> np.ndarray | None:
    dataset = workspace.current().dataset(contract.dataset) if contract.dataset else None
    if dataset is None or not dataset.exists():
        return None
    split = load_split(dataset, "val", contract.classes)
    if not len(split.slots):
        return None
    return split.read_images()

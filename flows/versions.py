"""Registered model versions: pin MODEL[@alias|:version] to one version, fetch its files into CNN_HOME, load it
with the project's own loader (state_dict with weights_only plus the JSON contract), and choose its precision."""

from __future__ import annotations

import functools
import re
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnn.errors import UserError
from cnn.evaluation import bf16_split_agreement
from cnn.inference import Predictor
from cnn.precision import PrecisionChoice, choose_inference_precision
from cnn.scoring import ModelRef
from flows import workspace

CHAMPION = "champion"
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|:(?P<version>\d+))?$")


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """MODEL, MODEL@alias or MODEL:version -> (name, alias, version); a bare name means @champion."""
    match = _SPEC.match(spec)
    if not match:
        raise UserError(f"invalid model {spec!r}: use MODEL, MODEL@alias or MODEL:version")
    alias, version = match["alias"], match["version"]
    return match["name"], (alias or (CHAMPION if version is None else None)), version


def fetch(name: str, version: str, run_id: str) -> Path:
    """The version's files under $CNN_HOME/models/NAME/VERSION-RUN (downloaded once). Keyed by the training run
    too, so a registry rebuilt with other models under the same numbers never serves a stale copy; downloaded
    into a temporary folder and renamed, so a killed download never looks like a usable model."""
    target = workspace.current().home / "models" / name / f"{version}-{run_id or 'norun'}"
    if target.is_dir():  # only ever renamed into place whole
        return target
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(partial))
        try:
            partial.rename(target)
        except OSError:  # another run fetched it meanwhile: use theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load(name: str, version: str, device: str = "cpu") -> Predictor:
    """A registered version as a plain Predictor (runs no code from the artifact)."""
    run_id = MlflowClient().get_model_version(name, version).run_id or ""
    weights, contract = _artifact_paths(fetch(name, version, run_id))
    return Predictor.load(weights, contract, device)


def resolve(spec: str, device: str, precision: str = "auto", compile: bool = False) -> ModelRef:
    """The concrete version, its local files, and the inference precision (and compilation) for this run."""
    name, alias, version = parse_spec(spec)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise UserError(
            f"model {spec!r} not found in the registry at {mlflow.get_tracking_uri()}; "
            "train one with `cnn train` or check the name, alias and version"
        ) from None
    run_id = mv.run_id or ""
    files = str(fetch(name, str(mv.version), run_id))
    ref = ModelRef(name, str(mv.version), run_id, files, device, compile=compile)
    choice = _choose_precision(client, ref, precision)
    return replace(ref, precision=choice.name, precision_reason=choice.describe())


def load_predictor(ref: ModelRef) -> Predictor:
    """The pinned version as the scoring engine runs it: batch norm folded, channels_last, its precision."""
    return _cached_predictor(ref.files, ref.device, ref.precision, ref.compile)


@functools.lru_cache(maxsize=4)
def _cached_predictor(model_dir: str, device: str, precision: str, compile: bool) -> Predictor:
    # Shards run one after another in this process (or on the same Dask worker): build the network, load
    # the weights and fold batch norm once per version rather than once per shard.
    weights, contract = _artifact_paths(Path(model_dir))
    predictor = Predictor.load(weights, contract, device, channels_last=True, fuse=True)
    predictor = predictor.with_precision(PrecisionChoice(precision, "").autocast_dtype)  # type: ignore[arg-type]  # a name the policy chose
    return predictor.compiled() if compile else predictor


def _artifact_paths(model_dir: Path) -> tuple[Path, Path]:
    """Where the pyfunc keeps its weights and contract, as its MLmodel file says (read as YAML, never executed)."""
    artifacts = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    return model_dir / artifacts["weights"]["path"], model_dir / artifacts["contract"]["path"]


def _choose_precision(client: MlflowClient, ref: ModelRef, requested: str) -> PrecisionChoice:
    """The precision policy for this version; the bf16 agreement is measured once per version on its validation
    split and kept as version tags (`cpu_bf16.agreement`, `cpu_bf16.enabled`)."""
    predictor = _cached_predictor(ref.files, ref.device, "fp32", False)

    def agreement() -> float | None:
        tags = client.get_model_version(ref.name, ref.version).tags
        if "cpu_bf16.agreement" in tags:
            return float(tags["cpu_bf16.agreement"])
        contract = predictor.contract
        dataset = workspace.current().dataset(contract.dataset) if contract.dataset else None
        if dataset is None or not dataset.exists():
            return None
        try:
            measured = bf16_split_agreement(predictor, dataset, "val")
        except UserError:  # the dataset changed its classes since: nothing to compare on
            return None
        if measured is not None:
            client.set_model_version_tag(ref.name, ref.version, "cpu_bf16.agreement", f"{measured:.6f}")
            client.set_model_version_tag(ref.name, ref.version, "cpu_bf16.checked_on", f"{contract.dataset}/val")
        return measured

    choice = choose_inference_precision(requested, predictor.device, agreement)
    if predictor.device.type == "cpu" and choice.agreement is not None:
        client.set_model_version_tag(ref.name, ref.version, "cpu_bf16.enabled", str(choice.name == "bf16").lower())
    return choice

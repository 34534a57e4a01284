"""Registered model versions: pin MODEL[@alias|:version] to one version, fetch its files into CNN_HOME, check them
against the sha256 digests recorded at registration, load them with the project's own loader (state_dict with
weights_only plus the JSON contract; nothing from the artifact is executed or unpickled), choose the precision."""

from __future__ import annotations

import functools
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnn.dataset import Dataset
from cnn.errors import UserError
from cnn.evaluation import bf16_split_agreement, bf16_split_speedup
from cnn.fsio import sha256_file
from cnn.inference import Predictor
from cnn.neighbours import History, Lookup, Reference
from cnn.precision import PrecisionChoice, choose_inference_precision, host_type
from cnn.scoring import ModelRef
from flows import workspace

CHAMPION = "champion"
DIGEST_TAGS = {"weights": "weights.sha256", "contract": "contract.sha256"}  # version tags set at registration
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|:(?P<version>\d+))?$")


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """MODEL, MODEL@alias or MODEL:version -> (name, alias, version); a bare name means @champion."""
    match = _SPEC.match(spec)
    if not match:
        raise UserError(f"invalid model {spec!r}: use MODEL, MODEL@alias or MODEL:version")
    alias, version = match["alias"], match["version"]
    return match["name"], (alias or (CHAMPION if version is None else None)), version


def record_digests(name: str, version: str, weights: Path, contract: Path) -> dict[str, str]:
    """Set the sha256 of the weights and the contract as version tags (at registration, from the run's files)."""
    digests = {"weights": sha256_file(weights), "contract": sha256_file(contract)}
    client = MlflowClient()
    for part, tag in DIGEST_TAGS.items():
        client.set_model_version_tag(name, version, tag, digests[part])
    return digests


def version_files(name: str, version: str) -> Path:
    """The version's files, fetched and checked against its recorded digests."""
    mv = MlflowClient().get_model_version(name, version)
    digests = {part: mv.tags[tag] for part, tag in DIGEST_TAGS.items() if tag in mv.tags}
    return fetch(name, str(mv.version), mv.run_id or "", digests)


def fetch(name: str, version: str, run_id: str, digests: dict[str, str] | None = None) -> Path:
    """The version's files under $CNN_HOME/models/NAME/VERSION-RUN-DIGEST (downloaded once). Keyed by the training
    run and the weights' digest too, so a registry rebuilt with other models under the same numbers never serves a
    stale copy; downloaded into a temporary folder and renamed, so a killed download never looks like a usable
    model. With `digests`, a copy whose files do not match is fetched again, and refused if the store's does not
    match either (a changed artifact)."""
    key = f"{version}-{run_id or 'norun'}" + (f"-{digests['weights'][:12]}" if digests else "")
    target = workspace.current().home / "models" / name / key
    if target.is_dir() and _matches(target, digests):  # only ever renamed into place whole
        return target
    shutil.rmtree(target, ignore_errors=True)  # a local copy that was changed: fetch the store's again
    _download(name, version, target)
    if not _matches(target, digests):
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(
            f"model {name} v{version}: its files do not match the sha256 digests recorded at registration "
            f"(tags {', '.join(DIGEST_TAGS.values())}); the artifact was changed since, so it is not loaded"
        )
    return target


def _matches(model_dir: Path, digests: dict[str, str] | None) -> bool:
    if not digests:  # registered before digests were recorded: nothing to check against
        return True
    weights, contract = _artifact_paths(model_dir)
    found = {"weights": sha256_file(weights), "contract": sha256_file(contract)}
    return all(found[part] == digests.get(part, found[part]) for part in found)


def _download(name: str, version: str, target: Path) -> None:
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


def load(name: str, version: str, device: str = "cpu") -> Predictor:
    """A registered version as a plain Predictor (runs no code from the artifact)."""
    weights, contract = _artifact_paths(version_files(name, version))
    return Predictor.load(weights, contract, device)


def find_version(spec: str) -> ModelVersion:
    """The registered version MODEL[@alias|:version] names (a bare name: @champion); UserError if none."""
    name, alias, version = parse_spec(spec)
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise UserError(
            f"model {spec!r} not found in the registry at {mlflow.get_tracking_uri()}; "
            "train one with `cnn train` or check the name, alias and version"
        ) from None


def load_spec(spec: str, device: str = "cpu") -> tuple[ModelVersion, Predictor]:
    """The version MODEL[@alias|:version] names and a plain (unfused, fp32) Predictor of it."""
    mv = find_version(spec)
    return mv, load(mv.name, str(mv.version), device)


def resolve(spec: str, device: str, precision: str = "auto", compile: bool = False) -> ModelRef:
    """The concrete version, its local files, and the inference precision (and compilation) for this run."""
    mv = find_version(spec)
    name, client = mv.name, MlflowClient()
    files = str(version_files(name, str(mv.version)))
    ref = ModelRef(name, str(mv.version), mv.run_id or "", files, device, compile=compile)
    choice = _choose_precision(client, ref, precision)
    return replace(ref, precision=choice.name, precision_reason=choice.describe())


def load_predictor(ref: ModelRef) -> Predictor:
    """The pinned version as the scoring engine runs it: batch norm folded, channels_last, its precision."""
    return _cached_predictor(ref.files, ref.device, ref.precision, ref.compile)


def load_explainer(ref: ModelRef) -> Predictor:
    """The pinned version as Grad-CAM needs it: unfused, fp32, with gradients available."""
    return _cached_explainer(ref.files, ref.device)


@functools.lru_cache(maxsize=2)
def _cached_explainer(model_dir: str, device: str) -> Predictor:
    weights, contract = _artifact_paths(Path(model_dir))
    return Predictor.load(weights, contract, device)


@functools.lru_cache(maxsize=4)
def _cached_predictor(model_dir: str, device: str, precision: str, compile: bool) -> Predictor:
    # Shards run one after another in this process (or on the same Dask worker): build the network, load
    # the weights and fold batch norm once per version rather than once per shard.
    weights, contract = _artifact_paths(Path(model_dir))
    predictor = Predictor.load(weights, contract, device, channels_last=True, fuse=True)
    predictor = predictor.with_precision(PrecisionChoice(precision, "").autocast_dtype)  # type: ignore[arg-type]  # a name the policy chose
    return predictor.compiled() if compile else predictor


def reference(ref: ModelRef) -> Reference:
    """The version's reference files (training embeddings and hashes, drift statistics); absent before issue 12."""
    folder = _artifacts(Path(ref.files)).get("reference", {}).get("path", "artifacts/reference")
    return Reference(Path(ref.files) / folder)


def history(ref: ModelRef) -> History:
    """What this version scored so far, under CNN_HOME (shared by every run of the version)."""
    return History(workspace.current().home / "history" / ref.name / f"v{ref.version}")


def load_lookup(ref: ModelRef) -> Lookup | None:
    """The reference and history a shard compares its images with (None for a version without a reference)."""
    found = reference(ref)
    if not found.exists:
        return None
    scored = history(ref)
    return _cached_lookup(str(found.folder), str(scored.folder), scored.generation())


@functools.lru_cache(maxsize=2)
def _cached_lookup(reference_dir: str, history_dir: str, generation: str) -> Lookup:
    # keyed by the history's generation: a long-running process (cnn serve) sees what later runs added
    return Lookup.load(Reference(Path(reference_dir)), History(Path(history_dir)))


def _artifacts(model_dir: Path) -> dict[str, dict[str, str]]:
    """The pyfunc's artifacts, as its MLmodel file names them (read as YAML, never executed)."""
    flavors = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]
    found: dict[str, dict[str, str]] = flavors["python_function"]["artifacts"]
    return found


def _artifact_paths(model_dir: Path) -> tuple[Path, Path]:
    """Where the pyfunc keeps its weights and contract."""
    artifacts = _artifacts(model_dir)
    return model_dir / artifacts["weights"]["path"], model_dir / artifacts["contract"]["path"]


def _measured_once(
    client: MlflowClient,
    ref: ModelRef,
    dataset_name: str,
    key: str,
    digits: int,
    measure: Callable[[Dataset], float | None],
) -> float | None:
    """A measurement on the validation split of the version's dataset, kept as the version tag `key`: read from the
    tag when there, else measured and tagged (with `cpu_bf16.checked_on`); None when the dataset is gone or changed
    its classes since (nothing to measure on)."""
    tags = client.get_model_version(ref.name, ref.version).tags
    if key in tags:
        return float(tags[key])
    dataset = workspace.current().dataset(dataset_name) if dataset_name else None
    if dataset is None or not dataset.exists():
        return None
    try:
        measured = measure(dataset)
    except UserError:  # the dataset changed its classes since: nothing to compare on
        return None
    if measured is not None:
        client.set_model_version_tag(ref.name, ref.version, key, f"{measured:.{digits}f}")
        client.set_model_version_tag(ref.name, ref.version, "cpu_bf16.checked_on", f"{dataset_name}/val")
    return measured


def _choose_precision(client: MlflowClient, ref: ModelRef, requested: str) -> PrecisionChoice:
    """The precision policy for this version; the bf16 agreement is measured once per version on its validation
    split, bf16's speed once per version and host type, and both kept as version tags (`cpu_bf16.agreement`,
    `cpu_bf16.speedup.<host type>`, `cpu_bf16.enabled`)."""
    predictor = _cached_predictor(ref.files, ref.device, "fp32", False)
    name = predictor.contract.dataset

    def agreement() -> float | None:
        return _measured_once(client, ref, name, "cpu_bf16.agreement", 6, lambda d: bf16_split_agreement(predictor, d))

    def speedup() -> float | None:
        key = f"cpu_bf16.speedup.{host_type()}"
        return _measured_once(client, ref, name, key, 3, lambda d: bf16_split_speedup(predictor, d))

    choice = choose_inference_precision(requested, predictor.device, agreement, speedup)
    if predictor.device.type == "cpu" and choice.agreement is not None:
        client.set_model_version_tag(ref.name, ref.version, "cpu_bf16.enabled", str(choice.name == "bf16").lower())
    return choice

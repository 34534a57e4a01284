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
import numpy as np
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnn.batch.run import ModelRef
from cnn.choices import CHAMPION
from cnn.data.dataset import Dataset
from cnn.errors import UserError
from cnn.fsio import sha256_file
from cnn.infer import backends
from cnn.infer.backends import BackendChoice, Candidate, OnnxEngine
from cnn.infer.predictor import Predictor, bf16_agreement, bf16_speedup, relative_speeds
from cnn.model.contract import ModelContract
from cnn.model.precision import PrecisionChoice, choose_inference_precision, host_type, top1_agreement
from cnn.similarity.history import History
from cnn.similarity.reference import Reference
from cnn.similarity.reuse import Lookup
from cnn.trust.evaluation import split_images
from flows import workspace
from flows.faults import unreachable
from flows.mlflow_model import MANIFEST_TAG, manifest, manifest_digest

DIGEST_TAGS = {"weights": "weights.sha256", "contract": "contract.sha256", "onnx": "onnx.sha256"}  # shown in the UI
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|:(?P<version>\d+))?$")


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """MODEL, MODEL@alias or MODEL:version -> (name, alias, version); a bare name means @champion."""
    match = _SPEC.match(spec)
    if not match:
        raise UserError(f"invalid model {spec!r}: use MODEL, MODEL@alias or MODEL:version")
    alias, version = match["alias"], match["version"]
    return match["name"], (alias or (CHAMPION if version is None else None)), version


def record_digests(name: str, version: str, files: dict[str, Path]) -> str:
    """At registration: fetch the version's artifact, check that it holds the run's `files` (weights, contract and,
    where exported, onnx) unchanged, and set the digest of its manifest (MANIFEST_TAG) and the parts' digests as
    version tags. Loaders refuse a version without MANIFEST_TAG: its registration did not finish."""
    mv = MlflowClient().get_model_version(name, version)
    target = _cache_dir(name, version, mv.run_id or "", uuid.uuid4().hex)
    _download(name, version, target)
    found = manifest(target)
    parts = {part: sha256_file(path) for part, path in files.items()}
    missing = [part for part, digest in parts.items() if digest not in found.values()]
    if missing:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"model {name} v{version}: the registered artifact does not hold the run's {missing}")
    digest = manifest_digest(found)
    client = MlflowClient()
    for part, value in parts.items():
        client.set_model_version_tag(name, version, DIGEST_TAGS[part], value)
    client.set_model_version_tag(name, version, MANIFEST_TAG, digest)
    final = _cache_dir(name, version, mv.run_id or "", digest)
    shutil.rmtree(final, ignore_errors=True)
    target.rename(final)
    return digest


def version_files(name: str, version: str) -> Path:
    """The version's files, fetched and checked against the digest of its manifest; a version without one (its
    registration did not finish, or it predates manifests) is refused, never trusted."""
    mv = MlflowClient().get_model_version(name, version)
    digest = mv.tags.get(MANIFEST_TAG, "")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UserError(
            f"model {name} v{version} has no digest manifest (version tag {MANIFEST_TAG}): its registration did not "
            "finish, or it was registered before manifests existed, so nothing proves its files are the ones "
            "trained; it is not loaded (train it again, or use another version)"
        )
    return fetch(name, str(mv.version), mv.run_id or "", digest)


def _cache_dir(name: str, version: str, run_id: str, digest: str) -> Path:
    # keyed by the training run and the manifest's digest too, so a registry rebuilt with other models under the
    # same numbers never serves a stale copy
    return workspace.current().home / "models" / name / f"{version}-{run_id or 'norun'}-{digest[:12]}"


def fetch(name: str, version: str, run_id: str, digest: str) -> Path:
    """The version's files under $CNN_HOME/models/NAME/VERSION-RUN-DIGEST (downloaded once), whose manifest has the
    digest recorded at registration. Downloaded into a temporary folder and renamed, so a killed download never looks
    like a usable model; a copy that does not match is fetched again, and refused if the store's does not match
    either (a changed artifact)."""
    target = _cache_dir(name, version, run_id, digest)
    if target.is_dir() and manifest_digest(manifest(target)) == digest:  # only ever renamed into place whole
        return target
    shutil.rmtree(target, ignore_errors=True)  # a local copy that was changed: fetch the store's again
    _download(name, version, target)
    if manifest_digest(manifest(target)) != digest:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(
            f"model {name} v{version}: its files do not match the sha256 digests recorded at registration "
            f"(tag {MANIFEST_TAG}); the artifact was changed since, so it is not loaded"
        )
    return target


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


def load_version(mv: ModelVersion, device: str = "cpu") -> tuple[ModelRef, Predictor]:
    """A registered version pinned (its files fetched and checked once) and a plain Predictor of it."""
    files = version_files(mv.name, str(mv.version))
    weights, contract = _artifact_paths(files)
    ref = ModelRef(mv.name, str(mv.version), mv.run_id or "", str(files))
    return ref, Predictor.load(weights, contract, device)


def load_contract(name: str, version: str) -> ModelContract:
    """A registered version's data contract (its classes, input, operating points), checked like its weights."""
    return ModelContract.load(_artifact_paths(version_files(name, version))[1])


# "pending" from the moment a version is created, "true" once its digests, gate decision and card are recorded (set
# last, before the aliases move), "false" when a later training found its registration stopped part way
REGISTERED_TAG = "registration.complete"
GATE_TAG = "gate.decision"


def registration_state(mv: ModelVersion) -> str:
    """complete: the registration finished (REGISTERED_TAG true, or a version registered before that tag existed
    with its manifest digest, gate decision and card); incomplete: marked so by a later training; unfinished: it
    stopped part way (or is still under way)."""
    tags = mv.tags or {}
    marker = tags.get(REGISTERED_TAG)
    if marker is not None:
        return {"true": "complete", "false": "incomplete"}.get(marker, "unfinished")
    earlier = tags.get(MANIFEST_TAG) and tags.get(GATE_TAG, "gate_failed") != "gate_failed" and mv.description
    return "complete" if earlier else "unfinished"


def require_registered(mv: ModelVersion) -> None:
    """Refuse (UserError) a version whose registration did not finish: it is not scored, promoted or carded."""
    if registration_state(mv) == "complete":
        return
    tags = mv.tags or {}
    if tags.get(GATE_TAG) == "gate_failed":
        why = f"its promotion gate failed ({tags.get('gate.reason', 'no reason recorded')[:300]})"
    else:
        recorded = [what for tag, what in ((MANIFEST_TAG, "digests"), (GATE_TAG, "gate decision")) if tags.get(tag)]
        recorded += ["card"] if mv.description else []
        why = f"its registration stopped part way (recorded: {', '.join(recorded) or 'nothing beyond the files'})"
    raise UserError(
        f"model {mv.name} v{mv.version} is not usable: {why}, so it is not scored, promoted or carded. Train again "
        "(the next training marks it incomplete) or name a complete version"
    )


def find_version(spec: str) -> ModelVersion:
    """The registered version MODEL[@alias|:version] names (a bare name: @champion); UserError if none, or if its
    registration did not finish."""
    name, alias, version = parse_spec(spec)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        if unreachable(exc):  # a server that does not answer has not said the model is missing
            raise
        raise UserError(
            f"model {spec!r} not found in the registry at {mlflow.get_tracking_uri()}; "
            "train one with `cnn train` or check the name, alias and version"
        ) from None
    require_registered(mv)
    return mv


def load_pyfunc(spec: str) -> mlflow.pyfunc.PyFuncModel:
    """The MLflow pyfunc of MODEL[@alias|:version], its copy checked against the registry's manifest digest before
    MLflow imports anything from it (the pyfunc's own code included): the Python route for your own scripts."""
    mv = find_version(spec)
    return mlflow.pyfunc.load_model(str(version_files(mv.name, str(mv.version))))


def load_spec(spec: str, device: str = "cpu") -> tuple[ModelVersion, Predictor]:
    """The version MODEL[@alias|:version] names and a plain (unfused, fp32) Predictor of it."""
    mv = find_version(spec)
    return mv, load(mv.name, str(mv.version), device)


def resolve(spec: str, device: str, precision: str = "auto", compile: bool = False, backend: str = "torch") -> ModelRef:
    """The concrete version, its local files, and the backend, precision (and compilation) for this run."""
    mv = find_version(spec)
    name, client = mv.name, MlflowClient()
    files = str(version_files(name, str(mv.version)))
    ref = ModelRef(name, str(mv.version), mv.run_id or "", files, device, compile=compile)
    if compile and backend not in ("auto", "torch"):
        raise UserError(f"--compile compiles the torch model; it cannot be combined with --backend {backend}")
    if compile:  # torch.compile is its own fast path: the ONNX runtimes are not compared with it
        backend = "torch"
    choice = _choose_backend(client, ref, backend, precision)
    return replace(ref, precision=choice.precision, precision_reason=choice.describe(), backend=choice.backend)


def load_predictor(ref: ModelRef) -> Predictor:
    """The pinned version as the scoring engine runs it: batch norm folded, channels_last, its precision (or its ONNX
    export in the chosen runtime)."""
    return _cached_predictor(ref.files, ref.device, ref.precision, ref.compile, ref.backend)


def contract(ref: ModelRef) -> ModelContract:
    """The pinned version's data contract."""
    return ModelContract.load(_artifact_paths(Path(ref.files))[1])


def load_explainer(ref: ModelRef) -> Predictor:
    """The pinned version as Grad-CAM needs it: unfused, fp32, with gradients available."""
    return _cached_explainer(ref.files, ref.device)


@functools.lru_cache(maxsize=2)
def _cached_explainer(model_dir: str, device: str) -> Predictor:
    weights, contract = _artifact_paths(Path(model_dir))
    return Predictor.load(weights, contract, device)


@functools.lru_cache(maxsize=4)
def _cached_predictor(model_dir: str, device: str, precision: str, compile: bool, backend: str = "torch") -> Predictor:
    # Shards run one after another in this process (or on the same Dask worker): build the network, load
    # the weights and fold batch norm (or compile the ONNX runtime's model) once per version rather than once per shard.
    weights, contract = _artifact_paths(Path(model_dir))
    predictor = Predictor.load(weights, contract, device, channels_last=True, fuse=True)
    if backend != "torch":
        return predictor.with_engine(OnnxEngine(_onnx_file(Path(model_dir), precision), backend, precision))
    predictor = predictor.with_precision(PrecisionChoice(precision, "").autocast_dtype)  # type: ignore[arg-type]  # a name the policy chose
    return predictor.compiled() if compile else predictor


def _registered_onnx(model_dir: Path) -> Path | None:
    """The ONNX export logged with the version (None for versions registered before exports existed)."""
    folder = _artifacts(model_dir).get("onnx", {}).get("path")
    return model_dir / folder if folder else None


def _derived(model_dir: Path) -> Path:
    """Files this host derives from a version (an export for older versions, the int8 model), beside its copy."""
    return model_dir.with_name(model_dir.name + ".derived")


def _onnx_file(model_dir: Path, precision: str, images: Callable[[], np.ndarray] | None = None) -> Path:
    """The ONNX model a precision runs: the registered export (exported here for older versions); for int8 the model
    quantized from it, calibrated on `images` the first time (at resolve; a worker only loads it)."""
    exported = _registered_onnx(model_dir)
    if exported is None or not exported.is_file():
        exported = _derived(model_dir) / backends.ONNX_FILE
        if not exported.is_file():
            weights, contract = _artifact_paths(model_dir)
            backends.export_onnx(weights, contract, exported)
    if precision != "int8":
        return exported
    quantized = _derived(model_dir) / backends.INT8_FILE
    if not quantized.is_file():
        if images is None:
            raise UserError(f"{quantized.name} is missing beside {model_dir.name}: resolve the model again to build it")
        contract = ModelContract.load(_artifact_paths(model_dir)[1])
        backends.quantize_int8(exported, images(), contract, quantized)
    return quantized


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
    if measured is None:
        return None
    kept = f"{measured:.{digits}f}"  # the first run says what the tag says, as every later run will
    client.set_model_version_tag(ref.name, ref.version, key, kept)
    client.set_model_version_tag(ref.name, ref.version, "cpu_bf16.checked_on", f"{dataset_name}/val")
    return float(kept)


class _Validation:
    """The version's validation images and torch fp32's probabilities on them, decoded and computed at most once
    per resolve, whichever measurements need them."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self._images: np.ndarray | None = None
        self._reference: np.ndarray | None = None

    def images(self, dataset: Dataset) -> np.ndarray:
        if self._images is None:
            self._images = split_images(dataset, "val", self.predictor.contract)[0]
        return self._images

    def reference(self, dataset: Dataset) -> np.ndarray:
        if self._reference is None:
            self._reference = self.predictor.with_precision(None).predict_arrays(self.images(dataset), 128)
        return self._reference


def _choose_precision(client: MlflowClient, ref: ModelRef, requested: str, seen: _Validation) -> PrecisionChoice:
    """The precision policy for torch; the bf16 agreement is measured once per version on its validation split,
    bf16's speed once per version and host type, and both kept as version tags (`cpu_bf16.agreement`,
    `cpu_bf16.speedup.<host type>`, `cpu_bf16.enabled`)."""
    predictor, name = seen.predictor, seen.predictor.contract.dataset

    def agreement() -> float | None:
        def measure(d: Dataset) -> float | None:
            return bf16_agreement(predictor, seen.images(d)) if len(seen.images(d)) else None

        return _measured_once(client, ref, name, "cpu_bf16.agreement", 6, measure)

    def speedup() -> float | None:
        key = f"cpu_bf16.speedup.{host_type()}"
        return _measured_once(client, ref, name, key, 3, lambda d: bf16_speedup(predictor, seen.images(d)))

    choice = choose_inference_precision(requested, predictor.device, agreement, speedup)
    if predictor.device.type == "cpu" and choice.agreement is not None:
        client.set_model_version_tag(ref.name, ref.version, "cpu_bf16.enabled", str(choice.name == "bf16").lower())
    return choice


def _choose_backend(client: MlflowClient, ref: ModelRef, requested: str, precision: str) -> BackendChoice:
    """The backend policy (cnn.infer.backends.choose_backend) for this version: each ONNX candidate's agreement with
    torch fp32 is measured once per version (`backend.<candidate>.agreement`), its speed once per version and host type
    (`backend.<candidate>.speedup.<host type>`), and the choice kept as `backend.chosen.<host type>`."""
    seen = _Validation(_cached_predictor(ref.files, ref.device, "fp32", False))
    name, model_dir = seen.predictor.contract.dataset, Path(ref.files)

    built: dict[str, Predictor] = {}  # one session per candidate, for its agreement and its speed alike

    def candidate(c: Candidate, dataset: Dataset) -> Predictor:
        if c.key not in built:
            path = _onnx_file(model_dir, c.precision, lambda: seen.images(dataset))
            built[c.key] = seen.predictor.with_engine(OnnxEngine(path, c.backend, c.precision))
        return built[c.key]

    def agreement(c: Candidate) -> float | None:
        def measure(d: Dataset) -> float | None:
            if not len(seen.images(d)):
                return None
            return top1_agreement(seen.reference(d), candidate(c, d).predict_arrays(seen.images(d), 128))

        return _measured_once(client, ref, name, f"backend.{c.key}.agreement", 6, measure)

    def speedups(passed: list[Candidate]) -> dict[str, float]:
        tag = {c.key: f"backend.{c.key}.speedup.{host_type()}" for c in passed}
        known = client.get_model_version(ref.name, ref.version).tags
        missing = [c for c in passed if tag[c.key] not in known]
        dataset = workspace.current().dataset(name)
        if missing and dataset.exists():
            images = seen.images(dataset)
            measured = relative_speeds(seen.predictor, [candidate(c, dataset) for c in missing], images)
            for c, speed in zip(missing, measured):
                client.set_model_version_tag(ref.name, ref.version, tag[c.key], f"{speed:.3f}")
                known[tag[c.key]] = f"{speed:.3f}"
        return {c.key: float(known[tag[c.key]]) for c in passed if tag[c.key] in known}

    choice = backends.choose_backend(
        requested,
        seen.predictor.device,
        lambda: _choose_precision(client, ref, precision, seen),
        backends.onnx_candidates(requested, precision),
        agreement,
        speedups,
        forced_precision=precision != "auto",
    )
    if seen.predictor.device.type == "cpu" and requested == "auto":
        client.set_model_version_tag(ref.name, ref.version, f"backend.chosen.{host_type()}", choice.candidate.key)
    return choice

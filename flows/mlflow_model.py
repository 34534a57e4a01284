"""MLflow models-from-code entry point: a pyfunc that rebuilds the network from its contract and loads a
state_dict with weights_only=True. Input: a DataFrame with a `path` column (or `image` bytes). Output:
label, confidence, prob_<class> for each class, and error (None, or why a file could not be scored).

Before it imports any of the artifact's code (the `cnn` library under `code/`), it checks every file of the copy
against the digest of the version's manifest recorded in the registry at registration (version tag
`files.sha256`); a copy that does not match, or that does not come from the registry, is refused. This file is
also the one definition of that manifest (`manifest`, `manifest_digest`), which the project's own loader uses."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

MANIFEST_TAG = "files.sha256"  # the version tag holding the digest of the manifest
REGISTRY_META = "registered_model_meta"  # MLflow writes it (name, version) into every copy of a registered version


def manifest(model_dir: Path) -> dict[str, str]:
    """The sha256 of every file of a version's copy (weights, contract, reference, index, ONNX export, this code,
    the library under code/, MLmodel), by path relative to the copy; MLflow's own download marker is left out."""
    found = {}
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.name != REGISTRY_META):
        # hashed here rather than with cnn.fsio.sha256_file: this runs before the copy's cnn may be imported
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        found[path.relative_to(model_dir).as_posix()] = digest.hexdigest()
    return found


def manifest_digest(files: dict[str, str]) -> str:
    """One digest for a manifest: of its lines `sha256  path`, sorted by path (as sha256sum prints them)."""
    return hashlib.sha256("".join(f"{d}  {p}\n" for p, d in sorted(files.items())).encode()).hexdigest()


def verify_copy(model_dir: Path) -> None:
    """Refuse (raise MlflowException) a copy whose files are not those registered: the registry's tag is the
    reference, so a changed file, code included, is found before any of it is imported."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    meta = Path(model_dir) / REGISTRY_META
    if not meta.is_file():
        raise MlflowException(
            "this model is checked against the registry before its code runs: load it by its registry URI "
            "(models:/NAME/VERSION or models:/NAME@alias), with MLFLOW_TRACKING_URI naming that registry"
        )
    import yaml

    info = yaml.safe_load(meta.read_text(encoding="utf-8"))
    name, version = str(info["model_name"]), str(info["model_version"])
    recorded = MlflowClient().get_model_version(name, version).tags.get(MANIFEST_TAG, "")
    if not recorded or manifest_digest(manifest(Path(model_dir))) != recorded:
        raise MlflowException(
            f"model {name} v{version}: its files do not match the digest recorded at registration (tag "
            f"{MANIFEST_TAG}{'' if recorded else ', missing'}); it is not loaded"
        )


class CnnClassifier(mlflow.pyfunc.PythonModel):
    """Image classifier over files or bytes; preprocessing comes from the model's own contract."""

    def load_context(self, context: Any) -> None:
        verify_copy(Path(context.artifacts["contract"]).parents[1])  # <copy>/artifacts/contract.json
        from cnn.infer.predictor import Predictor

        self.predictor = Predictor.load(context.artifacts["weights"], context.artifacts["contract"], device="cpu")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "image" in model_input.columns:
            paths = model_input["path"] if "path" in model_input.columns else [None] * len(model_input)
            sources = [
                bytes(b) if isinstance(b, (bytes, bytearray)) else str(p) for b, p in zip(model_input["image"], paths)
            ]
        elif "path" in model_input.columns:
            sources = [str(p) for p in model_input["path"]]
        else:
            raise ValueError("input needs a `path` column (image file paths) or an `image` column (bytes)")
        batch_size = int((params or {}).get("batch_size", 64))
        return self.predictor.predict_files(sources, batch_size=batch_size)


if __name__ != "flows.mlflow_model":  # loaded by MLflow as the model's code; imported by the project, a library
    mlflow.models.set_model(CnnClassifier())

"""`cnn explain` and `cnn card`: look inside a registered version (its heat maps, feature maps and top classes for
chosen images) and read its model card. Read-only: nothing is registered, scored or tracked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from cnn.decode import DecodeError, decode_bytes, read_image_bytes
from cnn.errors import UserError
from cnn.explain import ImageExplanation, explain_image
from flows import versions

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ExplainOutcome:
    """What `cnn explain` wrote, and the files it could not read (one bad file never stops the others)."""

    model: str
    out_dir: Path
    explained: list[tuple[str, ImageExplanation]]  # (source file, its explanation)
    failed: list[tuple[str, str]]  # (source file, why)


def explain(images: list[str], spec: str, out_dir: Path, device: str = "cpu") -> ExplainOutcome:
    """Heat-map overlays, feature-map grids and top classes for each image, with the version's own decoder."""
    mv, predictor = versions.load_spec(spec, device)
    decode_spec = predictor.contract.decode_spec()
    out_dir.mkdir(parents=True, exist_ok=True)
    explained, failed, used = [], [], set()
    for source in images:
        try:
            array = np.array(decode_bytes(read_image_bytes(source, decode_spec), decode_spec).array)  # writable
        except DecodeError as exc:
            failed.append((source, exc.reason))
            continue
        name = _UNSAFE.sub("_", Path(source).stem) or "image"
        while name in used:  # two files of the same name in different folders
            name += "_"
        used.add(name)
        explained.append((source, explain_image(predictor, array, name, out_dir)))
    return ExplainOutcome(f"{mv.name} v{mv.version}", out_dir, explained, failed)


def card(spec: str) -> str:
    """The version's model card (Markdown), as logged with its training run."""
    mv = versions.find_version(spec)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="model_card/card.md")
    except (MlflowException, OSError):
        if mv.description:
            return str(mv.description)
        raise UserError(
            f"{mv.name} v{mv.version} has no model card (it was registered before cards existed); train again"
        ) from None
    return Path(path).read_text(encoding="utf-8")

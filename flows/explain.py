"""`cnn explain`, `cnn card` and `cnn similar`: look inside a registered version (its heat maps, feature maps and
top classes for chosen images), read its model card, find the cases nearest to an image. Read-only: nothing is
registered, scored or tracked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from cnn.data.dataset import cached_images
from cnn.errors import UserError
from cnn.io.decode import DecodeError, decode_bytes, read_image_bytes
from cnn.similarity.reference import nearest_rows
from cnn.trust.explain import ImageExplanation, explain_image, save_png, tile_sheet
from flows import versions, workspace
from flows.faults import unreachable

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
    except (MlflowException, OSError) as exc:
        if unreachable(exc):
            raise
        if mv.description:
            return str(mv.description)
        raise UserError(
            f"{mv.name} v{mv.version} has no model card (it was registered before cards existed); train again"
        ) from None
    return Path(path).read_text(encoding="utf-8")


@dataclass(frozen=True)
class SimilarOutcome:
    """The nearest training images and the nearest images scored before, and the contact sheet."""

    model: str
    label: str  # what the model predicts for the query image
    training: list[dict[str, object]]  # rank, similarity, image_id, label
    scored: list[dict[str, object]]  # rank, similarity, image_id, label, the carried id columns
    sheet: Path


def similar(image: str, spec: str, k: int, out: Path, device: str = "cpu") -> SimilarOutcome:
    """The k nearest training images (label, cosine similarity) and previously scored images (their carried id
    columns) of IMAGE, by the version's embeddings, as rows and as a contact sheet."""
    ref, predictor = versions.load_version(versions.find_version(spec), device)
    reference = versions.reference(ref)
    if not reference.exists:
        raise UserError(f"{ref.label} was registered before similar-case search existed; train a new version")
    decode_spec = predictor.contract.decode_spec()
    try:
        array = np.array(decode_bytes(read_image_bytes(image, decode_spec), decode_spec).array)
    except DecodeError as exc:
        raise UserError(f"cannot read {image}: {exc.reason}") from None
    probs, vector = predictor.predict_with_embeddings(array[None])
    training = reference.nearest(vector, k)[0]
    history = versions.history(ref)
    index = history.index()
    scored = nearest_rows(index, history.rows(), vector, k)[0] if index is not None else []
    for row in scored:
        row.update(json.loads(str(row.pop("ids") or "{}")))
    tiles = _training_images(predictor.contract.dataset, [str(r["image_id"]) for r in training])
    classes = predictor.contract.classes
    label = classes[int(probs[0].argmax())]
    captions = [f"query: {label} {probs[0].max():.2f}"] + [
        f"#{r['rank']} {r['label']} {r['similarity']:.3f}" for r in training
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet = save_png(tile_sheet([array, *tiles], captions, f"{ref.label}: nearest training images"), out)
    return SimilarOutcome(ref.label, label, training, scored, sheet)


def _training_images(dataset: str, image_ids: list[str]) -> list[np.ndarray | None]:
    """The training images from the dataset's cache (None where the dataset is not on this machine)."""
    return cached_images(workspace.current().dataset(dataset) if dataset else None, image_ids)

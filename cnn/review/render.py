"""The three pictures of a review task, made from the source file with the model that scored it: the image as the
model saw it (the ingest decoder: DICOM windowed, resized to the model's input), the Grad-CAM overlay of the
predicted class, and a sheet of the nearest training images with their labels."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from cnn.data.dataset import Dataset, cached_images
from cnn.infer.predictor import Predictor
from cnn.io.decode import decode_bytes, read_image_bytes
from cnn.metrics.operating_points import OperatingPoint
from cnn.review.tasks import Neighbour
from cnn.similarity.reference import Reference
from cnn.trust.explain import VIEW, heatmaps, overlay, tile_sheet

NEIGHBOURS = 5  # nearest training cases shown with each task


@dataclass(frozen=True)
class ReviewModel:
    """One registered version, as the push needs it: to decode, explain and find the nearest training cases."""

    name: str
    version: str
    predictor: Predictor
    reference: Reference | None  # None: registered before similar-case search existed
    training: Dataset | None  # the training images' cache, where the dataset is on this machine

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.contract.classes)

    @property
    def points(self) -> list[OperatingPoint]:
        return self.predictor.contract.points()


@dataclass(frozen=True)
class Rendered:
    """A task's pictures (encoded) and the nearest training cases they show."""

    image: bytes  # PNG
    overlay: bytes  # JPEG
    similar: bytes  # PNG
    neighbours: list[Neighbour]


def render(model: ReviewModel, path: str, label: str) -> Rendered:
    """The pictures of one review row: its file decoded as at scoring, explained for `label` (the predicted
    class); raises cnn.io.decode.DecodeError for a file that cannot be read again."""
    spec = model.predictor.contract.decode_spec()
    array = np.array(decode_bytes(read_image_bytes(path, spec), spec).array)
    classes = model.classes
    heat = heatmaps(model.predictor, array[None], [classes.index(label) if label in classes else 0])[0]
    neighbours: list[Neighbour] = []
    tiles: list[np.ndarray | None] = []
    if model.reference is not None and model.reference.exists:
        _, vector = model.predictor.predict_with_embeddings(array[None])
        near = model.reference.nearest(vector, NEIGHBOURS)[0]
        neighbours = [Neighbour(str(n["image_id"]), str(n["label"]), float(str(n["similarity"]))) for n in near]
        tiles = cached_images(model.training, [n.image_id for n in neighbours])
    captions = ["this image", *(f"{n.label} {n.similarity:.2f}" for n in neighbours)]
    sheet = tile_sheet([array, *tiles], captions, f"{model.name} v{model.version}: nearest training cases")
    return Rendered(
        _encode(_enlarged(array), "PNG"), _encode(overlay(array, heat), "JPEG"), _encode(sheet, "PNG"), neighbours
    )


def _enlarged(array: np.ndarray) -> Image.Image:
    """The model's input, pixel for pixel, enlarged (nearest neighbour) to at least VIEW so that a 28 px input is
    visible; no smoothing adds detail the model did not have."""
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    scale = max(1, -(-VIEW // max(picture.size)))
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def _encode(picture: Image.Image, kind: Literal["PNG", "JPEG"]) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=kind, **({"quality": 92} if kind == "JPEG" else {}))
    return buffer.getvalue()

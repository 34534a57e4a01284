"""The data contract a model carries: classes, input size, channels, resize, normalisation, policy.

Inference builds its preprocessing from this, never from constants written twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnn.choices import CLASS_NAME, CLASS_NAME_RULE, DATASET_NAME
from cnn.errors import UserError
from cnn.formats import migrated
from cnn.fsio import write_json_atomic
from cnn.io.decode import DecodeSpec
from cnn.limits import DEFAULT_MAX_FILE_BYTES
from cnn.metrics.operating_points import OperatingPoint

MAX_CLASSES = 10_000
CONTRACT_FORMAT = 1  # contract.json's format (cnn.formats)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ContractError(ValueError):
    """A contract that is malformed or out of range."""


@dataclass
class ModelContract:
    """What a trained model expects and produces."""

    model: str
    classes: list[str]
    channels: int
    image_size: int
    resize: str
    mean: list[float]
    std: list[float]
    model_options: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)  # albumentations serialisation (training only)
    dataset: str = ""
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # the ingest's decode limits travel with the model
    max_pixels: int | None = None
    format_version: int = CONTRACT_FORMAT
    temperature: float = 1.0  # calibration: every predictor divides the logits by it
    operating_points: list[dict[str, Any]] = field(default_factory=list)  # OperatingPoint.to_dict(), in order
    dataset_id: str = ""  # DatasetMeta.identity(): which data the dataset name stood for ("" before it was kept)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ContractError(problem)

    def problem(self) -> str:
        """What makes this contract unusable, or "": class names are checked here, not only at ingest, since they
        become columns and parts of file names; sizes and counts are bounded before anything is allocated."""
        classes = self.classes
        if not isinstance(classes, list) or len(classes) < 2 or len(classes) > MAX_CLASSES:
            return f"it must list 2 to {MAX_CLASSES} classes"
        bad = [c for c in classes if not isinstance(c, str) or not CLASS_NAME.match(c)]
        if bad:
            return f"class name(s) {', '.join(map(repr, bad[:3]))} are not {CLASS_NAME_RULE}"
        if len(set(classes)) != len(classes):
            return "its class names repeat"
        if self.channels not in (1, 3) or not isinstance(self.image_size, int) or not 8 <= self.image_size <= 4096:
            return f"channels {self.channels!r} and image size {self.image_size!r} are out of range (1 or 3; 8-4096)"
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std, default=0) <= 0:
            return "its mean and std must give one value per channel (std above 0)"
        if self.dataset and not DATASET_NAME.match(self.dataset):
            return f"dataset name {self.dataset!r} is not a valid name"
        if not (0 < self.temperature < 1e6) or not isinstance(self.max_file_bytes, int) or self.max_file_bytes <= 0:
            return "its temperature or file size limit is out of range"
        return ""

    def points(self) -> list[OperatingPoint]:
        """The operating points, in the order they decide."""
        return [OperatingPoint.from_dict(p) for p in self.operating_points]

    def flips_preserve_label(self) -> bool:
        """True when training augmented with horizontal flips: the policy says a mirror image has the same label
        (never so where laterality matters), so a test-time flip is a fair second look."""
        return "HorizontalFlip" in json.dumps(self.policy)

    @staticmethod
    def normalisation(channels: int, pretrained: bool) -> tuple[list[float], list[float]]:
        """ImageNet statistics for pretrained weights (averaged for gray), else a neutral 0.5 / 0.25."""
        if not pretrained:
            return [0.5] * channels, [0.25] * channels
        if channels == 3:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        return [float(np.mean(IMAGENET_MEAN))] * channels, [float(np.mean(IMAGENET_STD))] * channels

    def decode_spec(self) -> DecodeSpec:
        """How to decode a file for this model: the same decoder and limits as the ingest it trained on."""
        return DecodeSpec(  # channels and resize come from JSON as int and str; DecodeSpec validates both
            channels=self.channels,  # type: ignore[arg-type]  # an int from JSON; DecodeSpec checks 1 or 3
            size=self.image_size,
            resize=self.resize,  # type: ignore[arg-type]  # a str from JSON; DecodeSpec checks pad or crop
            max_file_bytes=self.max_file_bytes,
            max_pixels=self.max_pixels,
        )

    def save(self, path: str | Path) -> Path:
        """Write contract.json atomically."""
        return write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> ModelContract:
        """Read contract.json (the one reader of that file); a contract that is malformed or out of range is a
        UserError naming what is wrong."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ContractError("it is not a JSON object")
            return cls(**migrated(data, CONTRACT_FORMAT, {}, "the model's contract.json"))
        except (ValueError, TypeError, RecursionError) as exc:  # ContractError: ValueError; bad keys: TypeError
            raise UserError(f"the model's contract.json cannot be used: {exc}") from None


def to_model_input(
    batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW on `device` (the one evaluation transform).

    The permuted NHWC batch already has the channels_last layout, so no copy is needed for it; the
    normalisation is one fused multiply-add: (x / 255 - mean) / std = x * scale + shift.
    """
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32)
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    x = torch.addcmul(shift, x, scale)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()

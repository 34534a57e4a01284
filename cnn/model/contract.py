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

from cnn.formats import migrated
from cnn.fsio import write_json_atomic
from cnn.io.decode import DecodeSpec
from cnn.limits import DEFAULT_MAX_FILE_BYTES
from cnn.metrics.operating_points import OperatingPoint

CONTRACT_FORMAT = 1  # contract.json's format (cnn.formats)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        """Read contract.json (the one reader of that file)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**migrated(data, CONTRACT_FORMAT, {}, "the model's contract.json"))


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

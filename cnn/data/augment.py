"""Augmentation policies: albumentations pipelines by preset name or from albumentations' own YAML/JSON.

The same Policy object is validated here, applied on the fly in training, and saved with each model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from cnn.data.dataset import Dataset
from cnn.errors import UserError
from cnn.fsio import atomic_path

if TYPE_CHECKING:
    import albumentations as A


def _albumentations() -> Any:
    """albumentations, imported on first use (a third of a second that scoring never needs). It asks PyPI for a
    newer release when imported unless told not to: no network at run time."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # imported here: heavy (about a second), and only where a policy augments
    import albumentations

    return albumentations


def _none() -> A.Compose:
    alb = _albumentations()
    return alb.Compose([])


def _xray() -> A.Compose:
    """Mild geometry and exposure changes; no flips (anatomy has a side) and no colour shifts."""
    alb = _albumentations()
    return alb.Compose(
        [
            alb.Affine(scale=(0.93, 1.07), translate_percent=(-0.04, 0.04), rotate=(-7, 7), p=0.7),
            alb.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            alb.CLAHE(clip_limit=(1.0, 2.0), tile_grid_size=(4, 4), p=0.3),
        ]
    )


def _photo() -> A.Compose:
    """Phone and camera photos: flips, colour jitter, perspective, blur and JPEG artefacts."""
    alb = _albumentations()
    return alb.Compose(
        [
            alb.HorizontalFlip(p=0.5),
            alb.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.7),
            alb.Perspective(scale=(0.02, 0.06), p=0.3),
            alb.OneOf([alb.GaussianBlur(blur_limit=(3, 5)), alb.MotionBlur(blur_limit=(3, 5))], p=0.2),
            alb.ImageCompression(quality_range=(50, 95), p=0.3),
        ]
    )


def _shift() -> A.Compose:
    """Light geometry for small images: shifts and a little scaling (the pad-and-crop of CIFAR recipes); no flips,
    so it suits images where laterality matters."""
    alb = _albumentations()
    return alb.Compose([alb.Affine(scale=(0.9, 1.1), translate_percent=(-0.1, 0.1), p=0.8)])


def _light() -> A.Compose:
    """`shift` plus horizontal flips: for photos, where a mirror image has the same label."""
    alb = _albumentations()
    return alb.Compose([alb.HorizontalFlip(p=0.5), *_shift().transforms])


PRESETS: dict[str, Callable[[], A.Compose]] = {
    "none": _none,
    "xray": _xray,
    "photo": _photo,
    "shift": _shift,
    "light": _light,
}
AUTO = "auto"  # a preset chosen from the dataset: `light` for RGB, `shift` (never a flip) for grayscale


def resolve_policy(spec: str, channels: int) -> str:
    """The policy `spec` names for a dataset of `channels`: `auto` becomes `light` for RGB and `shift` for grayscale
    (grayscale is where X-rays are, and anatomy has a side); any other spec is itself."""
    if spec != AUTO:
        return spec
    return "light" if channels == 3 else "shift"


def list_policies() -> list[str]:
    """Names of the preset policies (and `auto`)."""
    return sorted([*PRESETS, AUTO])


@dataclass
class Policy:
    """A named albumentations pipeline that works on uint8 (H, W, C) arrays."""

    name: str
    transform: A.Compose

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = np.asarray(self.transform(image=image)["image"])
        return out if out.ndim == 3 else out[:, :, None]

    def to_dict(self) -> dict[str, Any]:
        """albumentations' own serialisation: what `A.from_dict` (and `load_policy` on a file) reads."""
        serialised: dict[str, Any] = _albumentations().to_dict(self.transform)
        return serialised

    def save(self, path: str | Path) -> Path:
        """Write the policy as YAML or JSON (by suffix) in albumentations' format."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        else:
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    def seed(self, seed: int) -> Policy:
        self.transform.set_random_seed(seed)
        return self


def load_policy(spec: str) -> Policy:
    """A preset by name, or an albumentations YAML/JSON file; UserError lists what is valid. (`auto` needs the
    dataset: see `resolve_policy`.)"""
    if spec in PRESETS:
        return Policy(spec, PRESETS[spec]())
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") and path.is_file():
        return Policy(path.stem, _load_file(path))
    raise UserError(
        f"unknown augmentation policy {spec!r}: use a preset ({', '.join(list_policies())}) "
        "or a .yaml/.json file in albumentations' serialisation format"
    )


def policy_from_dict(data: dict[str, Any], name: str = "custom") -> Policy:
    """Rebuild a policy saved with `Policy.to_dict` (e.g. from a model's metadata)."""
    return Policy(name, _compose(_albumentations().from_dict(data)))


def _load_file(path: Path) -> A.Compose:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
        if not isinstance(data, dict) or "transform" not in data:
            raise ValueError("expected a mapping with a 'transform' key (albumentations' A.save format)")
        return _compose(_albumentations().from_dict(data))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"invalid augmentation policy {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - yaml and albumentations raise their own error types
        raise UserError(f"invalid augmentation policy {path}: {type(exc).__name__}: {exc}") from None


def _compose(transform: Any) -> A.Compose:
    alb = _albumentations()
    compose: A.Compose = transform if isinstance(transform, alb.Compose) else alb.Compose([transform])
    return compose


def validate_policy(policy: Policy, channels: int, size: int) -> None:
    """Run the policy on a test image of the dataset's shape; UserError if it breaks or changes the shape."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    for seed in range(3):
        try:
            out = policy.seed(seed)(image)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's pipeline is a policy error
            raise UserError(
                f"policy {policy.name!r} fails on {channels}-channel {size}x{size} images: {type(exc).__name__}: {exc}"
            ) from None
        if out.shape != image.shape or out.dtype != np.uint8:
            raise UserError(
                f"policy {policy.name!r} turns a {image.shape} uint8 image into {out.shape} {out.dtype}; "
                "policies must keep the size, channels and dtype (the cache is already resized)"
            )


def render_preview(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    policy: Policy,
    augmented: int = 5,
    seed: int = 0,
    cell: int = 128,
) -> Image.Image:
    """A grid: one row per image, the original first, then `augmented` samples of the policy."""
    policy.seed(seed)
    pad, header = 4, 16
    width = pad + (augmented + 1) * (cell + pad)
    height = header + len(images) * (cell + pad + header) + pad
    grid = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(grid)
    draw.text(
        (pad, 2), f"policy: {policy.name}   (left: original, then {augmented} augmented samples)", fill=(230, 230, 230)
    )
    for row, (image, label) in enumerate(zip(images, labels)):
        y = header + row * (cell + pad + header)
        draw.text((pad, y + 2), str(label), fill=(255, 210, 120))
        samples = [image] + [policy(image) for _ in range(augmented)]
        for col, sample in enumerate(samples):
            grid.paste(_to_tile(sample, cell), (pad + col * (cell + pad), y + header))
    return grid


def _to_tile(array: np.ndarray, cell: int) -> Image.Image:
    mode_image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return mode_image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)


def preview_dataset(
    dataset_root: str | Path, policy: Policy, out: str | Path, rows: int = 6, augmented: int = 5, seed: int = 0
) -> Path:
    """Render a preview grid for `rows` training images of an ingested dataset (spread over classes)."""

    dataset = Dataset(dataset_root).require()
    meta = dataset.meta()
    validate_policy(policy, meta.channels, meta.image_size)
    ok = dataset.usable("train", distinct=True)
    rng = np.random.default_rng(seed)
    picks: list[Any] = []
    by_class = {
        label: group.sample(frac=1.0, random_state=int(rng.integers(2**31))) for label, group in ok.groupby("label")
    }
    while len(picks) < rows and any(len(g) for g in by_class.values()):
        for label in sorted(by_class):
            if len(by_class[label]) and len(picks) < rows:
                picks.append(by_class[label].iloc[0])
                by_class[label] = by_class[label].iloc[1:]
    cache = dataset.open_cache()
    index = cache.index()
    images = list(cache.images.read([index[row["image_id"]] for row in picks]))
    grid = render_preview(images, [row["label"] for row in picks], policy, augmented, seed)
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--preview must end in .png or .jpg, not {out.name}")
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG" if out.suffix.lower() == ".png" else "JPEG")
    return out

"""Augmentation policies: presets, files in albumentations' format, validation and the preview grid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn.config import IngestOptions
from cnn.data.augment import (
    list_policies,
    load_policy,
    policy_from_dict,
    preview_dataset,
    render_preview,
    resolve_policy,
    validate_policy,
)
from cnn.data.ingest import ingest
from cnn.errors import UserError


@pytest.mark.parametrize("name", ["none", "xray", "photo", "shift", "light"])
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_keep_shape_and_dtype(name: str, channels: int) -> None:
    policy = load_policy(name)
    validate_policy(policy, channels, 32)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, channels), dtype=np.uint8)
    out = policy.seed(1)(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    if name == "none":
        np.testing.assert_array_equal(out, image)


def test_xray_preset_has_no_colour_or_flip_transforms() -> None:
    names = {type(t).__name__ for t in load_policy("xray").transform.transforms}
    assert "CLAHE" in names and not names & {"HorizontalFlip", "ColorJitter", "HueSaturationValue"}


def test_unknown_policy_lists_presets() -> None:
    with pytest.raises(UserError, match="auto, light, none, photo, shift, xray"):
        load_policy("sparkle")
    assert list_policies() == ["auto", "light", "none", "photo", "shift", "xray"]


def test_auto_flips_photos_and_never_grayscale_images() -> None:
    """`auto` is `light` (flips and shifts) for RGB and `shift` for grayscale, where anatomy has a side; a model
    trained with it says so in its contract, which decides the scoring's mirror-image check."""
    from cnn.model.contract import ModelContract

    assert (resolve_policy("auto", 3), resolve_policy("auto", 1), resolve_policy("xray", 3)) == (
        "light",
        "shift",
        "xray",
    )

    def contract(policy: str) -> ModelContract:
        return ModelContract("m", ["a", "b"], 1, 8, "pad", [0.5], [0.25], policy=load_policy(policy).to_dict())

    assert contract("light").flips_preserve_label() and not contract("shift").flips_preserve_label()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_policy_file_round_trip(tmp_path: Path, suffix: str) -> None:
    original = load_policy("photo")
    path = original.save(tmp_path / f"policy{suffix}")
    loaded = load_policy(str(path))
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(original.seed(5)(image), loaded.seed(5)(image))
    again = policy_from_dict(original.to_dict())
    np.testing.assert_array_equal(original.seed(6)(image), again.seed(6)(image))


def test_invalid_policy_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("transform: {__class_fullname__: NoSuchTransform}\n")
    with pytest.raises(UserError, match="invalid augmentation policy"):
        load_policy(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="transform"):
        load_policy(str(tmp_path / "list.json"))


def test_policy_that_changes_shape_is_refused(tmp_path: Path) -> None:
    import albumentations as A

    from cnn.data.augment import Policy

    with pytest.raises(UserError, match="keep the size"):
        validate_policy(Policy("resize", A.Compose([A.Resize(8, 8)])), 3, 32)


def test_preview_grid(write_images: Callable[..., Path], tmp_path: Path) -> None:
    root = tmp_path / "datasets" / "pets"
    ingest(write_images(per_class=8), root, IngestOptions(image_size=24, decode_workers=1))
    out = preview_dataset(root, load_policy("photo"), tmp_path / "preview.png", rows=4, augmented=3)
    grid = Image.open(out)
    assert grid.size[0] == 4 + 4 * (128 + 4)
    assert grid.size[1] > 4 * 128
    direct = render_preview([np.zeros((24, 24, 3), np.uint8)], ["x"], load_policy("none"), augmented=2)
    assert direct.size == (4 + 3 * 132, 16 + 148 + 4)

"""Perceptual hashes and layouts: imagehash's pHash bit for bit, views per shape, blank images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnn.data.demo import render_claim
from cnn.similarity import fingerprints
from cnn.similarity.fingerprints import crop_views, layouts, phashes
from cnn.similarity.reuse import HashTable


def _letterbox(image: np.ndarray, size: int = 64) -> np.ndarray:
    """As the decoder pads: black bars around the content."""
    out = np.zeros((size, size, 3), np.uint8)
    top = (size - image.shape[0]) // 2
    out[top : top + image.shape[0], : image.shape[1]] = image
    return out


def _claims(seeds: range | list[int]) -> list[Image.Image]:
    return [render_claim("dent", np.random.default_rng(seed), (160, 120)) for seed in seeds]


def _shown(photo: Image.Image) -> np.ndarray:
    """As a model at 64 px sees it: long side 64, letterboxed."""
    w, h = photo.size
    return _letterbox(np.asarray(photo.resize((64, round(64 * h / w)))))


def _table(images: np.ndarray, prefix: str = "id") -> HashTable:
    plain, mirrored = phashes(images)
    rows = pd.DataFrame({"image_id": [f"{prefix}{i}" for i in range(len(images))], "phash": plain})
    grid = [bytes(v) for v in layouts(images)]
    return HashTable(rows.assign(phash_mirror=mirrored, layout=grid, path_key=[f"k{i}" for i in range(len(images))]))


@pytest.mark.parametrize("channels", [1, 3])
def test_both_perceptual_hashes_are_imagehashs_phash_bit_for_bit(channels: int) -> None:
    """Both hashes from one DCT match imagehash on every shape, from upscaling to reducing 8x, taller or wider than
    the 64 px pHash resizes to, hashed in one call."""
    import imagehash

    rng = np.random.default_rng(channels)
    sides = [(int(rng.integers(17, 90)), int(rng.integers(17, 90))) for _ in range(20)]
    sides += [(int(rng.integers(40, 500)), int(rng.integers(40, 500))) for _ in range(40)]
    images = [np.asarray(p) for p in _claims(range(6))] + [
        rng.integers(1, 256, (h, w, 3), dtype=np.uint8) for h, w in sides + [(96, 80), (200, 131), (200, 133)]
    ]
    images = [image[:, :, :channels] if channels == 3 else image[:, :, :1] for image in images]
    plain, mirrored = fingerprints.region_phashes(images)
    assert phashes(images[0][None]) == ([plain[0]], [mirrored[0]])  # the public call: content first, same hash
    for image, ours, ours_mirrored in zip(images, plain, mirrored):
        picture = Image.fromarray(image[:, :, 0] if channels == 1 else image)
        assert ours == str(imagehash.phash(picture, hash_size=fingerprints.HASH_SIZE)), image.shape
        flipped = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert ours_mirrored == str(imagehash.phash(flipped, hash_size=fingerprints.HASH_SIZE)), image.shape


def test_a_shard_of_images_of_several_shapes_gets_each_its_own_views() -> None:
    photos = _claims(range(3))
    shown = np.stack([_shown(photos[0]), _shown(photos[1].crop((0, 0, 160, 80))), _shown(photos[2])])
    views = crop_views(shown)  # two content shapes: 64 x 48 and 64 x 32
    assert [v.small.shape[:2] for v in views] == [(24, 32), (16, 32), (24, 32)]
    assert all(np.array_equal(v.views, crop_views(image[None])[0].views) for v, image in zip(views, shown))


def test_a_blank_image_is_no_ones_copy_by_layout() -> None:
    blank = np.full((1, 64, 64, 3), 128, np.uint8)
    table = _table(blank)
    found = table.matches(["other"], [""], [""], views=crop_views(blank + 1))
    assert found == [None]

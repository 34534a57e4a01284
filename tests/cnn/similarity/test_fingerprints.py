"""Perceptual hashes and layouts: imagehash's pHash bit for bit, views per shape, blank images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnn.similarity import fingerprints
from cnn.similarity.fingerprints import crop_views, phashes
from tests.cnn.similarity.images import claims, hash_table, shown


@pytest.mark.parametrize("channels", [1, 3])
def test_both_perceptual_hashes_are_imagehashs_phash_bit_for_bit(channels: int) -> None:
    """Both hashes from one DCT match imagehash on every shape, from upscaling to reducing 8x, taller or wider than
    the 64 px pHash resizes to, hashed in one call."""
    import imagehash

    rng = np.random.default_rng(channels)
    sides = [(int(rng.integers(17, 90)), int(rng.integers(17, 90))) for _ in range(20)]
    sides += [(int(rng.integers(40, 500)), int(rng.integers(40, 500))) for _ in range(40)]
    images = [np.asarray(p) for p in claims(range(6))] + [
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
    photos = claims(range(3))
    seen = np.stack([shown(photos[0]), shown(photos[1].crop((0, 0, 160, 80))), shown(photos[2])])
    views = crop_views(seen)  # two content shapes: 64 x 48 and 64 x 32
    assert [v.small.shape[:2] for v in views] == [(24, 32), (16, 32), (24, 32)]
    assert all(np.array_equal(v.views, crop_views(image[None])[0].views) for v, image in zip(views, seen))


def test_a_blank_image_is_no_ones_copy_by_layout() -> None:
    blank = np.full((1, 64, 64, 3), 128, np.uint8)
    table = hash_table(blank)
    found = table.matches(["other"], [""], [""], views=crop_views(blank + 1))
    assert found == [None]

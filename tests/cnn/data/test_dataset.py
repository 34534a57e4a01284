"""The dataset on disk: names, the current generation, the sharded image cache read by global slot."""

from __future__ import annotations

import numpy as np
import pytest

from cnn.data.dataset import ShardedImages, validate_name
from cnn.errors import UserError


def test_names_are_checked_before_they_become_folders() -> None:
    assert validate_name("xray-2026.v1") == "xray-2026.v1"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(UserError, match="invalid name"):
            validate_name(bad)


def test_sharded_images_read_global_slots_across_shards_in_the_order_asked() -> None:
    first = np.arange(3 * 2 * 2 * 1, dtype=np.uint8).reshape(3, 2, 2, 1)
    second = 100 + np.arange(2 * 2 * 2 * 1, dtype=np.uint8).reshape(2, 2, 2, 1)
    images = ShardedImages([first, second])
    assert len(images) == 5 and images.image_shape == (2, 2, 1)
    read = images.read([4, 0, 3, 2])
    np.testing.assert_array_equal(read, np.stack([second[1], first[0], second[0], first[2]]))

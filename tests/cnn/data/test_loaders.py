"""Training loaders read the cache: a split resolved to cache slots, whole batches in one read, uint8 NHWC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnn.data.dataset import Dataset
from cnn.data.loaders import CacheDataset, load_split, make_loader


def test_a_loader_yields_the_splits_cached_images_and_labels(patterns: Path) -> None:
    dataset = Dataset(patterns)
    classes = dataset.meta().classes
    split = load_split(dataset, "val", classes)
    rows = dataset.usable("val", distinct=True)
    assert split.labels.tolist() == [classes.index(label) for label in rows["label"]]
    images, labels = next(iter(make_loader(CacheDataset(split), batch_size=7, train=False, workers=0)))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (7, 24, 24, 1)
    np.testing.assert_array_equal(images.numpy(), split.read_images()[:7])
    assert labels.tolist() == split.labels[:7].tolist()

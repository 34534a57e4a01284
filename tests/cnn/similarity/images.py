"""Images as the reuse check meets them (photos, letterboxed as the decoder pads, claims photos at 64 px) and
tables of their fingerprints: shared by the similarity tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from cnn.data.demo import render_claim
from cnn.similarity.fingerprints import layouts, phashes
from cnn.similarity.reuse import HashTable


def photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    return np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(small).resize((64, 48)), dtype=np.uint8)


def letterbox(image: np.ndarray, size: int = 64) -> np.ndarray:
    """As the decoder pads: black bars around the content."""
    out = np.zeros((size, size, 3), np.uint8)
    top = (size - image.shape[0]) // 2
    out[top : top + image.shape[0], : image.shape[1]] = image
    return out


def claims(seeds: range | list[int]) -> list[Image.Image]:
    return [render_claim("dent", np.random.default_rng(seed), (160, 120)) for seed in seeds]


def shown(photo: Image.Image) -> np.ndarray:
    """As a model at 64 px sees it: long side 64, letterboxed."""
    w, h = photo.size
    return letterbox(np.asarray(photo.resize((64, round(64 * h / w)))))


def hash_table(images: np.ndarray, prefix: str = "id") -> HashTable:
    plain, mirrored = phashes(images)
    rows = pd.DataFrame({"image_id": [f"{prefix}{i}" for i in range(len(images))], "phash": plain})
    grid = [bytes(v) for v in layouts(images)]
    return HashTable(rows.assign(phash_mirror=mirrored, layout=grid, path_key=[f"k{i}" for i in range(len(images))]))

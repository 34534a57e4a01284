"""How far a near copy may be from its original, by the size of the image and by how alike the version's own
training images are: the reuse check's tolerances (pHash bits, layout RMS), kept per version in reuse.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cnn.similarity.fingerprints import COARSE_BELOW, HASH_SIZE, LAYOUT_RMS, hash_bits

NEAR_BITS = 10  # Hamming distance (of 256 bits) up to which two images count as the same photo (bench/reuse.py)
# Small images have few pixels to differ by: a copy resized by 0.5-2x and saved as JPEG at quality 70 moves more of
# their hash bits and layout cells than a photo's. bench/reuse.py --data garments, such copies against distinct
# images of the same class: at 28 px within 42 bits and 6.7 RMS (95th percentile) against 66 bits and 13.9 RMS or
# more; at 64 px within 12 bits against 56. So the tolerances may grow, linearly in the content's long side, from
# their photo values at TOLERANT_FROM px to at most these at SMALL_SIDE px and below, as far as the version's own
# training images allow (Tolerance.calibrate).
SMALL_SIDE, TOLERANT_FROM = 32, 64
SMALL_NEAR_BITS, SMALL_LAYOUT_RMS, SMALL_COARSE_BELOW = 40, 7.5, 10.0
# The share of a version's training images its small-image tolerances may call a copy of another training image,
# and the training images it takes to measure that share (fewer: the photo tolerances; from 36 images a new image of
# the same kind was within the smallest training distance of some training image, so it was called a copy).
TOLERANCE_QUANTILE = 0.001
CALIBRATE_FROM = 1000


@dataclass(frozen=True)
class Tolerance:
    """Content of TOLERANT_FROM px and more on its long side (photos): NEAR_BITS and LAYOUT_RMS. Smaller content:
    growing linearly to `small_bits` and `small_rms` at SMALL_SIDE px, which are at most SMALL_NEAR_BITS and
    SMALL_LAYOUT_RMS and no more than the version's training images allow (`calibrate`): distinct generated X-rays
    at 32 px are as alike as copies of one garment scan at 28 px, so one fixed small-image tolerance would call them
    copies. The default is the photo tolerance at every size (versions registered before calibration)."""

    small_bits: float = NEAR_BITS
    small_rms: float = LAYOUT_RMS

    def bits(self, side: int) -> int:
        return round(between(NEAR_BITS, self.small_bits, side))

    def rms(self, side: int) -> float:
        return between(LAYOUT_RMS, self.small_rms, side)

    def gate(self, side: int) -> float:
        """The coarse-grid gate before the refinement, widened in proportion to the layout tolerance."""
        share = (self.small_rms - LAYOUT_RMS) / (SMALL_LAYOUT_RMS - LAYOUT_RMS)
        return between(COARSE_BELOW, COARSE_BELOW + share * (SMALL_COARSE_BELOW - COARSE_BELOW), side)

    def to_dict(self) -> dict[str, float]:
        return {"small_near_bits": self.small_bits, "small_layout_rms": self.small_rms}

    @classmethod
    def from_dict(cls, found: dict[str, Any]) -> Tolerance:
        """From reuse.json (clipped to the allowed range); the photo tolerances where it has none."""
        bits, rms = found.get("small_near_bits"), found.get("small_layout_rms")
        if not isinstance(bits, int | float) or not isinstance(rms, int | float):
            return cls()
        return cls(_clip(bits, NEAR_BITS, SMALL_NEAR_BITS), _clip(rms, LAYOUT_RMS, SMALL_LAYOUT_RMS))

    @classmethod
    def calibrate(cls, rows: pd.DataFrame) -> Tolerance:
        """From a version's training rows (phash and phash_mirror of the images decoded at its size; at least
        CALIBRATE_FROM of them, else the photo tolerances): the pHash tolerance for small images stops short of the
        distance within which TOLERANCE_QUANTILE of the training images have another, distinct training image (or
        its mirror image); the layout tolerance grows in the same proportion (a layout is searched over 441 crops,
        so its nearest uncropped distance would overstate how far apart distinct images stay)."""
        # imported here: heavy (FAISS): only where a version's reference is built
        import faiss

        n = len(rows)
        if n < CALIBRATE_FROM:
            return cls()
        plain, mirrored = hash_bits(rows["phash"].tolist()), hash_bits(rows["phash_mirror"].tolist())
        index = faiss.IndexBinaryFlat(HASH_SIZE * HASH_SIZE)
        index.add(np.concatenate([plain, mirrored]))  # row i and n + i: image i and its mirror image
        distances, found = index.search(plain, 4)
        other = (found % n != np.arange(n)[:, None]) & (found >= 0)
        nearest = np.where(other, distances, 10**6).min(axis=1)
        bits = _clip(float(np.quantile(nearest, TOLERANCE_QUANTILE)) - 1, NEAR_BITS, SMALL_NEAR_BITS)
        share = (bits - NEAR_BITS) / (SMALL_NEAR_BITS - NEAR_BITS)
        return cls(bits, round(LAYOUT_RMS + share * (SMALL_LAYOUT_RMS - LAYOUT_RMS), 3))


def smallness(side: int) -> float:
    """0 for content of TOLERANT_FROM px and more on its long side, 1 at SMALL_SIDE px and below, linear between."""
    return float(np.clip((TOLERANT_FROM - side) / (TOLERANT_FROM - SMALL_SIDE), 0.0, 1.0))


def between(photo: float, small: float, side: int) -> float:
    """A tolerance for content of `side` px: `photo` for photos, `small` for small images (see smallness)."""
    return photo + (small - photo) * smallness(side)


def _clip(value: float, low: float, high: float) -> float:
    return float(np.clip(value, low, high))

"""Image fingerprints for the reuse check: perceptual hashes (imagehash's pHash, of the image and of its mirror
image) and layouts (a grid of mean colours of the central region) with the crop views a cropped copy is found by."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

HASH_SIZE = 16  # pHash of 16 x 16 = 256 bits: 64 bits told distinct photos of one class apart too rarely
# The layout: an image's central region (a crop may have cut up to LAYOUT_MARGIN off any side) as a grid of mean
# colours, from the image reduced to LAYOUT_SIDE px. A query is compared in every crop it may have had (up to
# CROP_MOST off each axis in CROP_STEP steps: 441 views, the best refined in quarter steps) with the few earlier
# layouts nearest to its uncropped views, and counts as a copy within LAYOUT_RMS (0-255 levels; bench/reuse.py:
# copies <= 2.3, distinct photos of one class >= 10.8, distinct generated X-rays >= 3.1).
LAYOUT_GRID, LAYOUT_MARGIN, LAYOUT_SIDE = 8, 0.10, 32
COARSE_GRID = 4  # the 441 crops are first tried on 4 x 4 cells (a quarter of the work), the best refined on 8 x 8
CROP_MOST, CROP_STEP = 0.10, 0.02
LAYOUT_RMS, REFINED = 2.5, 3  # the 3 nearest on the coarse grid are refined
# Gates before the refinement (its 2 x 625 crops are the costly part): the grey RMS on the coarse grid, then the RMS
# of all cells at that best coarse crop. Cropped copies in bench/reuse.py came within 2.0 and 4.8 (claims photos),
# 3.9 and 6.2 (X-rays); distinct claims photos passing the first gate were 11.9 or more at the second.
COARSE_BELOW, REFINE_BELOW = 5.0, 8.0
FLAT_LAYOUT = 2.0  # a layout whose cells vary less than this (a blank or uniform image) identifies nothing


def content(image: np.ndarray) -> np.ndarray:
    """The image without the letterbox bars the decoder added (`pad`): a copy at another size or aspect ratio
    must hash like its original."""
    rows = np.flatnonzero(image.reshape(image.shape[0], -1).max(axis=1))  # reductions over contiguous memory
    cols = np.flatnonzero(image.max(axis=0).max(axis=1))
    if not len(rows) or not len(cols):
        return image
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def phashes(images: np.ndarray) -> tuple[list[str], list[str]]:
    """(pHash, pHash of the mirror image) of each decoded image's content, as 64 hex digits: imagehash's pHash
    (256 bits), bit for bit, with both hashes from one DCT. Mirroring a row reverses it, which only flips the sign
    of the odd horizontal frequencies, so the second resize and DCT imagehash would run are not needed (half the
    cost; tests/cnn/test_neighbours.py checks both against imagehash.phash)."""
    return region_phashes([content(image) for image in images])


def region_phashes(regions: Sequence[np.ndarray]) -> tuple[list[str], list[str]]:
    # imported here: heavy: only where the statistic is computed
    import scipy.fftpack
    from PIL import Image

    if not regions:
        return [], []
    side = HASH_SIZE * 4  # imagehash's highfreq_factor
    pixels = np.stack(
        [
            np.asarray(
                Image.fromarray(region[:, :, 0] if region.shape[2] == 1 else region)
                .convert("L")
                .resize((side, side), Image.Resampling.LANCZOS)
            )
            for region in regions
        ]
    )
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=1), axis=2)[:, :HASH_SIZE, :HASH_SIZE]  # one call each
    out = []
    for signed in (low, low * _MIRROR_SIGNS):
        bits = (signed > np.median(signed, axis=(1, 2), keepdims=True)).reshape(len(signed), -1)
        out.append([row.tobytes().hex() for row in np.packbits(bits, axis=1)])
    return out[0], out[1]


_MIRROR_SIGNS = np.where(np.arange(HASH_SIZE) % 2 == 1, -1.0, 1.0)


def hash_bits(hexes: Sequence[str]) -> np.ndarray:
    """(N, bytes) uint8 rows of hex hashes (zeros for a missing one)."""
    width = HASH_SIZE * HASH_SIZE // 8
    return np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) if h else np.zeros(width, np.uint8) for h in hexes])


_CROPS = [
    (left, right)
    for left in np.arange(0, CROP_MOST + 1e-9, CROP_STEP)
    for right in np.arange(0, CROP_MOST + 1e-9, CROP_STEP)
    if left + right <= CROP_MOST + 1e-9
]
_MIDDLE = next(i for i, (a, b) in enumerate(_CROPS) if a == b and a >= CROP_MOST / 2 - CROP_STEP)
_SEARCHED_CROPS = [_CROPS[0], _CROPS[_MIDDLE]]  # on each axis: the views that find the candidates in the index


def _reduced(region: np.ndarray) -> np.ndarray:
    """An image's content (no letterbox) with its long side at LAYOUT_SIDE px, as float32 (h, w, channels)."""
    # imported here: heavy (OpenCV): only for the reuse check's layouts
    import cv2

    h, w, channels = region.shape
    scale = LAYOUT_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(np.ascontiguousarray(region), size, interpolation=cv2.INTER_AREA)
    return small.reshape(size[1], size[0], channels).astype(np.float32)


def _cells(n_px: int, start: float, stop: float, g: int = LAYOUT_GRID) -> np.ndarray:
    """(g, n_px) weights that average pixels over g equal cells of [start, stop) (fractions of the axis)."""
    edges = np.linspace(start, stop, g + 1) * n_px
    px = np.arange(n_px)
    covered = np.clip(edges[1:, None], px, px + 1) - np.clip(edges[:-1, None], px, px + 1)
    weights: np.ndarray = (covered / covered.sum(axis=1, keepdims=True)).astype(np.float32)
    return weights


@functools.lru_cache(maxsize=1024)
def _crop_cells(n_px: int, crops: tuple[tuple[float, float], ...], g: int = LAYOUT_GRID) -> np.ndarray:
    """(len(crops) * g, n_px): for each crop (off the start, off the end) an axis may have had, the g cells of the
    original's central region in the cropped axis's pixels."""
    m = LAYOUT_MARGIN
    return np.concatenate([_cells(n_px, (m - a) / (1 - a - b), (1 - m - a) / (1 - a - b), g) for a, b in crops])


def _grid(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, g: int = LAYOUT_GRID) -> np.ndarray:
    """(N, len(rows) // g, len(cols) // g, g * g * channels): images of one shape (N, h, w, c) through every pair
    of row and column cells (two matrix products for the whole stack)."""
    n, h, w, c = images.shape
    a, b = len(rows) // g, len(cols) // g
    by_col = (images.transpose(0, 1, 3, 2).reshape(n * h * c, w) @ cols.T).reshape(n, h, c * b * g)
    both = (rows @ by_col).reshape(n, a, g, c, b, g)  # rows contract h
    grid: np.ndarray = both.transpose(0, 1, 4, 2, 5, 3).reshape(n, a, b, g * g * c)
    return grid


def layouts(images: np.ndarray) -> np.ndarray:
    """(N, LAYOUT_GRID^2 * channels) uint8: each image's central region as a grid of mean colours."""
    channels = images.shape[3] if np.ndim(images) == 4 else 1
    out = np.zeros((len(images), LAYOUT_GRID * LAYOUT_GRID * channels), np.float32)
    uncropped = (_CROPS[0],)
    for positions, smalls in _by_shape([_reduced(content(image)) for image in images]):
        _, h, w, _ = smalls.shape
        out[positions] = _grid(smalls, _crop_cells(h, uncropped), _crop_cells(w, uncropped))[:, 0, 0]
    return as_bytes(out)


def as_bytes(layouts: np.ndarray) -> np.ndarray:
    """Layouts rounded to uint8, as they are stored."""
    stored: np.ndarray = np.clip(np.rint(layouts), 0, 255).astype(np.uint8)
    return stored


def _by_shape(smalls: list[np.ndarray]) -> list[tuple[list[int], np.ndarray]]:
    """Reduced images grouped by shape: (their positions, their stack)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, small in enumerate(smalls):
        groups.setdefault(small.shape, []).append(i)
    return [(positions, np.stack([smalls[i] for i in positions])) for positions in groups.values()]


def pooled(layouts: np.ndarray) -> np.ndarray:
    """Layouts (N, LAYOUT_GRID^2 * c) on the coarse grid in grey (N, COARSE_GRID^2): the mean of each block of cells
    over the channels."""
    f = LAYOUT_GRID // COARSE_GRID
    cells = layouts.reshape(len(layouts), COARSE_GRID, f, COARSE_GRID, f, -1).astype(np.float32)
    pooled: np.ndarray = cells.mean(axis=(2, 4, 5)).reshape(len(layouts), -1)
    return pooled


@dataclass(frozen=True)
class CropViews:
    """An image as the reuse check compares it with earlier layouts: reduced (`small`), as its original's layout
    for each crop on the coarse grid of crops and cells, in grey (`views`: len(_CROPS)^2 rows of COARSE_GRID^2
    cells; grey does a third of the work and picks the same crop), and
    for the few crops that search the index (`searched`, full layouts)."""

    small: np.ndarray
    views: np.ndarray
    searched: np.ndarray
    norms: np.ndarray  # each view's squared length
    flat: bool  # a blank or uniform image: nobody's copy by layout
    side: int  # the content's long side in px, before reduction: small images may be matched more loosely

    def coarse(self, pooled: np.ndarray, pooled_norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each earlier layout (on the coarse grid: `pooled`, with its squared lengths), the RMS difference for
        the best crop on the coarse grid, and that crop (a row of `views`)."""
        squared = self.norms[:, None] - 2 * self.views @ pooled.T + pooled_norms
        best = squared.argmin(axis=0)
        rms = np.sqrt(np.maximum(squared[best, np.arange(len(best))], 0) / self.views.shape[1])
        return rms, best

    def refined(self, layout: np.ndarray, best: int) -> float:
        """The RMS difference to an earlier layout (all its cells) for the best crop: from the coarse grid's best
        (`best`, a row of `views`), refined twice on grids half as wide around it; infinite where that coarse crop
        is already REFINE_BELOW or more away."""
        rows, cols = _CROPS[best // len(_CROPS)], _CROPS[best % len(_CROPS)]
        h, w, _ = self.small.shape
        there = _grid(self.small[None], _crop_cells(h, (rows,)), _crop_cells(w, (cols,)))[0, 0, 0]
        if np.sqrt(((there - layout) ** 2).mean()) >= REFINE_BELOW:
            return float("inf")
        rms = float("inf")
        for half in (CROP_STEP, CROP_STEP / 2):
            rms, rows, cols = self._around(layout, rows, cols, half)
        return rms

    def _around(
        self, layout: np.ndarray, rows: tuple[float, float], cols: tuple[float, float], half: float
    ) -> tuple[float, tuple[float, float], tuple[float, float]]:
        """The best crop within `half` of (rows, cols) on each edge, in steps of half / 2: (RMS, rows, cols)."""
        h, w, _ = self.small.shape
        row_crops, col_crops = _crops_around(*rows, half), _crops_around(*cols, half)
        fine = _grid(self.small[None], _crop_cells(h, row_crops), _crop_cells(w, col_crops))[0]
        rms = np.sqrt(((fine - layout) ** 2).mean(axis=2))
        i, j = np.unravel_index(int(rms.argmin()), rms.shape)
        return float(rms[i, j]), row_crops[i], col_crops[j]


def _crops_around(first: float, last: float, half: float) -> tuple[tuple[float, float], ...]:
    """Crops (off the start, off the end) within `half` of (first, last), in steps of half / 2."""
    starts = np.clip(np.linspace(first - half, first + half, 5), 0, LAYOUT_MARGIN)
    ends = np.clip(np.linspace(last - half, last + half, 5), 0, LAYOUT_MARGIN)
    return tuple((round(float(a), 5), round(float(b), 5)) for a in starts for b in ends)


def crop_views(images: np.ndarray) -> list[CropViews]:
    """Each image's CropViews (images of one reduced shape computed together)."""
    return region_views([content(image) for image in images])


def region_views(regions: Sequence[np.ndarray]) -> list[CropViews]:
    out: list[CropViews | None] = [None] * len(regions)
    crops, searched_crops = tuple(_CROPS), tuple(_SEARCHED_CROPS)
    for positions, smalls in _by_shape([_reduced(region) for region in regions]):
        _, h, w, _ = smalls.shape
        greys = smalls.mean(axis=3, keepdims=True)
        views = _grid(greys, _crop_cells(h, crops, COARSE_GRID), _crop_cells(w, crops, COARSE_GRID), COARSE_GRID)
        found = _grid(smalls, _crop_cells(h, searched_crops), _crop_cells(w, searched_crops))
        views = views.reshape(len(positions), -1, views.shape[3])
        norms = (views**2).sum(axis=2)
        flat = _flat(found[:, 0, 0])
        for i, small, view, norm, first, blank in zip(positions, smalls, views, norms, found, flat):
            side = max(regions[i].shape[:2])
            out[i] = CropViews(small, view, first.reshape(-1, first.shape[2]), norm, bool(blank), side)
    return [v for v in out if v is not None]


def layout_matrix(rows: pd.DataFrame) -> np.ndarray | None:
    """The rows' layouts as float32 (rows without one far from any image), or None when no row has one."""
    values = rows["layout"] if "layout" in rows.columns else []
    width = next((len(v) for v in values if isinstance(v, bytes | bytearray) and len(v)), None)
    return layouts_of(rows, width) if width is not None else None


def layouts_of(rows: pd.DataFrame, width: int) -> np.ndarray:
    """The rows' layouts of `width` cells as float32; a row without one (or of another width) far from any image."""
    out = np.full((len(rows), width), 1e4, np.float32)  # never within LAYOUT_RMS of a real layout
    for i, value in enumerate(rows["layout"] if "layout" in rows.columns else []):
        if isinstance(value, bytes | bytearray) and len(value) == width:
            out[i] = np.frombuffer(value, np.uint8)
    return out


def _flat(layouts: np.ndarray) -> np.ndarray:
    """For each layout (N, cells * channels), whether it is a blank or uniform image: its cells hardly vary in any
    channel."""
    cells = layouts.reshape(len(layouts), LAYOUT_GRID * LAYOUT_GRID, -1)
    flat: np.ndarray = cells.std(axis=1).max(axis=1) < FLAT_LAYOUT
    return flat

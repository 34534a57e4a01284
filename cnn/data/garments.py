"""`garments`: a procedural stand-in for the small grayscale catalogue scans that real 10-class sets hold (28 px
product silhouettes), large enough to choose training recipes at real sizes (tens of thousands of images).

Ten classes in three families that are hard to tell apart at 28 px, as in real catalogue data: upper-body garments
(t-shirt, pullover, coat, shirt, dress: sleeves, length, collar, an opening and texture differ, and a shirt may have
short or long sleeves), footwear (sandal, sneaker, ankle boot: height and straps) and the distinct trouser and bag.
Every image varies in pose (scale, shift, a small rotation), proportions, fabric brightness and texture, and
carries sensor noise; a share of the images is deliberately ambiguous (a coat without its opening line, a long
t-shirt), so no recipe reaches 100 %. Rendered at 4x and reduced with a box filter, which is how a scan reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GARMENT_CLASSES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
_SCALE = 4  # rendered at 4x the output size
Draw = Callable[[ImageDraw.ImageDraw, np.random.Generator, float, int], None]


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _upper(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    s: float,
    fill: int,
    *,
    sleeve: float,
    length: float,
    flare: float = 0.0,
    collar: bool = False,
    opening: bool = False,
    buttons: bool = False,
) -> None:
    """A torso with sleeves `sleeve` (share of the arm), `length` (share of the image), flaring by `flare` at the hem."""
    cx, top = 0.5 * s, _u(rng, 0.12, 0.18) * s
    shoulder, waist = _u(rng, 0.2, 0.26) * s, _u(rng, 0.17, 0.23) * s
    hem = waist + flare * s
    bottom = top + length * s
    draw.polygon([(cx - shoulder, top), (cx + shoulder, top), (cx + hem, bottom), (cx - hem, bottom)], fill=fill)
    if sleeve > 0:
        arm, width = sleeve * _u(rng, 0.5, 0.62) * s, _u(rng, 0.08, 0.11) * s
        angle = _u(rng, 0.35, 0.75)  # radians below the horizontal
        for side in (-1, 1):
            x0, y0 = cx + side * shoulder, top
            dx, dy = side * arm * np.cos(angle), arm * np.sin(angle)
            nx, ny = -np.sin(angle) * width * side, np.cos(angle) * width
            draw.polygon(
                [(x0, y0), (x0 + dx, y0 + dy), (x0 + dx - nx, y0 + dy + ny), (x0 - nx * 1.4, y0 + ny * 1.6)], fill=fill
            )
    neck = _u(rng, 0.06, 0.09) * s
    draw.ellipse([cx - neck, top - neck * 0.6, cx + neck, top + neck * 0.9], fill=0)
    dark = max(0, fill - int(rng.integers(70, 130)))
    if collar:
        draw.polygon([(cx - neck, top), (cx, top + neck * 1.3), (cx + neck, top)], fill=min(255, fill + 40))
    if opening:
        draw.line([(cx, top + neck), (cx, bottom)], fill=dark, width=max(1, int(s * 0.02)))
    if buttons:
        for k in range(int(rng.integers(3, 6))):
            y = top + neck * 1.4 + k * (bottom - top - neck) / 6
            draw.ellipse([cx - s * 0.025, y - s * 0.025, cx + s * 0.025, y + s * 0.025], fill=dark)


def _tshirt(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    _upper(draw, rng, s, fill, sleeve=_u(rng, 0.2, 0.38), length=_u(rng, 0.58, 0.78))


def _pullover(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    _upper(draw, rng, s, fill, sleeve=_u(rng, 0.85, 1.2), length=_u(rng, 0.58, 0.72), collar=rng.random() < 0.05)


def _coat(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    _upper(
        draw, rng, s, fill, sleeve=_u(rng, 0.95, 1.25), length=_u(rng, 0.66, 0.82), flare=_u(rng, 0.0, 0.05),
        collar=rng.random() < 0.6, opening=rng.random() < 0.75, buttons=rng.random() < 0.3,
    )  # fmt: skip


def _shirt(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    long = rng.random() < 0.6
    _upper(
        draw, rng, s, fill, sleeve=_u(rng, 0.85, 1.15) if long else _u(rng, 0.22, 0.38), length=_u(rng, 0.6, 0.76),
        collar=rng.random() < 0.9, buttons=rng.random() < 0.7, opening=rng.random() < 0.2,
    )  # fmt: skip


def _dress(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    sleeve = 0.0 if rng.random() < 0.5 else _u(rng, 0.15, 0.35)
    _upper(draw, rng, s, fill, sleeve=sleeve, length=_u(rng, 0.72, 0.84), flare=_u(rng, 0.03, 0.16))


def _trouser(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    cx, top, bottom = 0.5 * s, _u(rng, 0.08, 0.14) * s, _u(rng, 0.85, 0.94) * s
    half, gap = _u(rng, 0.13, 0.2) * s, _u(rng, 0.005, 0.03) * s
    flare = _u(rng, -0.02, 0.04) * s
    crotch = top + _u(rng, 0.22, 0.32) * s
    draw.rectangle([cx - half, top, cx + half, crotch], fill=fill)
    draw.polygon([(cx - half, crotch), (cx - gap, crotch), (cx - gap, bottom), (cx - half - flare, bottom)], fill=fill)
    draw.polygon([(cx + gap, crotch), (cx + half, crotch), (cx + half + flare, bottom), (cx + gap, bottom)], fill=fill)


def _shoe(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int, *, height: float, straps: bool
) -> None:
    """A side view: a sole and an upper of `height` (share of the image); straps leave gaps in the upper."""
    left, right = _u(rng, 0.06, 0.14) * s, _u(rng, 0.86, 0.95) * s
    sole = _u(rng, 0.62, 0.72) * s
    thick = _u(rng, 0.04, 0.08) * s
    draw.rectangle([left, sole, right, sole + thick], fill=min(255, fill + 30))
    heel = left + _u(rng, 0.22, 0.34) * (right - left)
    top = sole - height * s
    draw.polygon(
        [(left, sole), (left, top), (heel, top), (right, sole - _u(rng, 0.05, 0.1) * s), (right, sole)], fill=fill
    )
    if straps:
        for k in range(int(rng.integers(2, 5))):
            x = left + (k + 1) * (right - left) / 5 + _u(rng, -0.03, 0.03) * s
            draw.rectangle([x, top, x + _u(rng, 0.03, 0.07) * s, sole - _u(rng, 0.01, 0.04) * s], fill=0)
    else:
        lace = max(0, fill - int(rng.integers(50, 110)))
        for k in range(int(rng.integers(0, 4))):
            x = heel + (k + 1) * _u(rng, 0.05, 0.08) * s
            draw.line([(x, top + 0.02 * s), (x + 0.04 * s, top + 0.06 * s)], fill=lace, width=max(1, int(s * 0.015)))


def _sandal(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    _shoe(draw, rng, s, fill, height=_u(rng, 0.1, 0.26), straps=rng.random() < 0.97)


def _sneaker(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    _shoe(draw, rng, s, fill, height=_u(rng, 0.14, 0.26), straps=rng.random() < 0.03)


def _boot(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    _shoe(draw, rng, s, fill, height=_u(rng, 0.26, 0.5), straps=rng.random() < 0.1)


def _bag(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float, fill: int) -> None:
    cx, top, bottom = 0.5 * s, _u(rng, 0.3, 0.45) * s, _u(rng, 0.8, 0.92) * s
    half = _u(rng, 0.25, 0.42) * s
    draw.rectangle([cx - half, top, cx + half, bottom], fill=fill)
    if rng.random() < 0.8:
        handle = _u(rng, 0.1, 0.25) * s
        box = [cx - half * _u(rng, 0.3, 0.7), top - handle, cx + half * _u(rng, 0.3, 0.7), top + handle]
        draw.arc(box, 180, 360, fill=fill, width=max(2, int(s * 0.03)))


_DRAW: dict[str, Draw] = {
    "tshirt": _tshirt,
    "trouser": _trouser,
    "pullover": _pullover,
    "dress": _dress,
    "coat": _coat,
    "sandal": _sandal,
    "shirt": _shirt,
    "sneaker": _sneaker,
    "bag": _bag,
    "ankle_boot": _boot,
}


def render_garment(label: str, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """One garment scan as uint8 (size, size): the silhouette posed, textured and noisy."""
    s = size * _SCALE
    canvas = Image.new("L", (s, s), 0)
    fill = int(rng.integers(70, 256))
    _DRAW[label](ImageDraw.Draw(canvas), rng, float(s), fill)
    canvas = canvas.rotate(
        _u(rng, -15, 15),
        resample=Image.Resampling.BILINEAR,
        translate=(round(_u(rng, -0.1, 0.1) * s), round(_u(rng, -0.1, 0.1) * s)),
    )
    zoom = _u(rng, 0.75, 1.15)
    side = int(s * zoom)
    canvas = canvas.resize((side, side), Image.Resampling.BILINEAR)
    if side >= s:
        off = (side - s) // 2
        canvas = canvas.crop((off, off, off + s, off + s))
    else:
        padded = Image.new("L", (s, s), 0)
        padded.paste(canvas, ((s - side) // 2, (s - side) // 2))
        canvas = padded
    image = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = 1.0 + _u(rng, 0.0, 0.5) * np.sin(2 * np.pi * (x * _u(rng, 0, 6) + y * _u(rng, 0, 6)) + _u(rng, 0, 6))
    light = 1.0 + _u(rng, -0.4, 0.4) * (x - 0.5) + _u(rng, -0.4, 0.4) * (y - 0.5)  # uneven lighting
    backdrop = _u(rng, 0.0, 0.15) * (1 + np.sin(2 * np.pi * (x * _u(rng, 0, 3) + y * _u(rng, 0, 3))))
    image = np.maximum(image * texture * light, backdrop) + rng.normal(0, _u(rng, 0.02, 0.1), image.shape)
    return np.asarray(np.clip(image, 0, 1) * 255 + 0.5, dtype=np.uint8)


def write_garments(out: Path, n: int, seed: int, size: int = 28) -> int:
    """Write `n` balanced garment PNGs in class folders under `out`; how many were written."""
    for label in GARMENT_CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        label = GARMENT_CLASSES[i % len(GARMENT_CLASSES)]
        Image.fromarray(render_garment(label, rng, size)).save(out / label / f"g{i:06d}.png", compress_level=1)
    return n

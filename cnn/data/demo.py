"""Deterministic synthetic datasets for the demo, the tests and the benchmarks.

`xray`: grayscale chest-X-ray-like images (normal / nodule / opacity), imbalanced, several images per
patient listed in a manifest with a `group` column, a few DICOM and 16-bit PNG files, exact duplicates
and a few corrupt files. `claims`: RGB vehicle-photo-like JPEGs (none / scratch / dent / broken_glass)
in class folders. The findings are small and low-contrast, placed at random, on anatomy or cars that
vary in position, size and exposure, so that pixel statistics alone do not give the label away.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cnn.data.garments import write_garments
from cnn.errors import UserError

XRAY_CLASSES = {"normal": 0.55, "nodule": 0.25, "opacity": 0.20}
CLAIMS_CLASSES = {"none": 0.4, "scratch": 0.2, "dent": 0.2, "broken_glass": 0.2}


@dataclass(frozen=True)
class DemoDataset:
    """Where a generated dataset went and what to ingest."""

    kind: str
    root: Path
    source: Path  # what to pass to `cnn ingest`
    images: int
    corrupt: int


def list_kinds() -> list[str]:
    return sorted(GENERATORS)


def generate(kind: str, out: str | Path, n: int | None = None, seed: int = 0, size: int | None = None) -> DemoDataset:
    """Write demo dataset `kind` under `out` (n images, source side `size` px)."""
    if kind not in GENERATORS:
        raise UserError(f"unknown demo dataset {kind!r}; choose one of: {', '.join(list_kinds())}")
    return GENERATORS[kind](Path(out), n, seed, size)


def _rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i])


def _pick_label(rng: np.random.Generator, classes: dict[str, float]) -> str:
    names = list(classes)
    return names[int(rng.choice(len(names), p=list(classes.values())))]


def _gaussian(h: int, w: int, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.asarray(np.exp(-(((y - cy) / sy) ** 2 + ((x - cx) / sx) ** 2) / 2.0), dtype=np.float32)


# --- xray --------------------------------------------------------------------------------


def render_xray(label: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One chest-X-ray-like image as float32 in [0, 1] (H, W)."""
    h = w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2 + rng.normal(0, w * 0.04), h / 2 + rng.normal(0, h * 0.04)
    scale = rng.uniform(0.85, 1.1)
    body = ((x - cx) / (0.46 * w * scale)) ** 2 + ((y - cy) / (0.52 * h * scale)) ** 2 < 1
    img = np.where(body, 0.62, 0.08).astype(np.float32)
    lungs = []
    for side in (-1, 1):
        lx, ly = cx + side * 0.2 * w * scale, cy - 0.02 * h
        ax, ay = 0.14 * w * scale * rng.uniform(0.9, 1.1), 0.3 * h * scale * rng.uniform(0.9, 1.1)
        mask = ((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2 < 1
        img[mask] -= 0.3
        lungs.append((lx, ly, ax, ay, mask))
    ribs = 0.06 * (np.sin((y - cy) / (h * 0.035) + 0.3 * np.abs(x - cx) / w * 6) > 0.6)
    img += ribs * body
    img += 0.18 * np.exp(-(((x - cx) / (0.035 * w)) ** 2)) * body  # spine
    if label in ("nodule", "opacity"):
        lx, ly, ax, ay, mask = lungs[int(rng.integers(2))]
        if label == "nodule":
            for _ in range(int(rng.integers(1, 3))):
                r, t = np.sqrt(rng.uniform(0, 0.6)), rng.uniform(0, 2 * np.pi)
                sigma = rng.uniform(0.018, 0.03) * w
                img += rng.uniform(0.22, 0.35) * _gaussian(
                    h, w, ly + r * ay * np.sin(t), lx + r * ax * np.cos(t), sigma, sigma
                )
        else:
            oy, ox = ly + rng.uniform(0.1, 0.5) * ay, lx + rng.uniform(-0.3, 0.3) * ax
            blob = _gaussian(h, w, oy, ox, rng.uniform(0.1, 0.16) * h, rng.uniform(0.07, 0.11) * w)
            img += rng.uniform(0.18, 0.28) * blob * mask
    gain, offset = rng.uniform(0.8, 1.15), rng.uniform(-0.08, 0.08)
    noisy = img * gain + offset + rng.normal(0, 0.04, img.shape)
    blurred = np.asarray(
        Image.fromarray(np.clip(noisy * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    )
    return np.clip(blurred.astype(np.float32) / 255.0 + rng.normal(0, 0.015, blurred.shape), 0, 1)


def _write_dicom(path: Path, image: np.ndarray, monochrome1: bool, index: int) -> None:
    """A 12-bit uncompressed DICOM with rescale slope/intercept and a VOI window."""
    # imported here: heavy; DICOM files only
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name), str(index)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", f"demo-{index}"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024  # stored 0..4095 -> -1024..7166
    ds.WindowCenter, ds.WindowWidth = 3071, 8190
    stored = np.rint(image * 4095).astype(np.uint16)
    if monochrome1:
        stored = 4095 - stored
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _generate_xray(out: Path, n: int | None, seed: int, size: int | None) -> DemoDataset:
    n, size = n or 600, size or 128
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    patient, left = 0, 0
    label = "normal"
    for i in range(n):
        rng = _rng(seed, i)
        if left == 0:  # a new patient with 1-4 studies, mostly of one finding
            patient, left = patient + 1, int(rng.integers(1, 5))
            label = _pick_label(rng, XRAY_CLASSES)
        left -= 1
        study_label = label if rng.uniform() < 0.85 else _pick_label(rng, XRAY_CLASSES)
        image = render_xray(study_label, rng, size)
        group = f"P{patient:04d}"
        if i % 97 == 5:
            name = f"img{i:05d}.dcm"
            _write_dicom(images / name, image, monochrome1=(i % 2 == 0), index=i)
        elif i % 53 == 7:
            name = f"img{i:05d}.png"  # 16-bit grayscale PNG (12 bits used)
            Image.fromarray(np.rint(image * 4095).astype(np.uint16)).save(images / name)
        else:
            name = f"img{i:05d}.png"
            Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(images / name)
        rows.append((f"images/{name}", study_label, group))
        if i % 101 == 3:  # the same file exported twice for the same patient
            dup = f"img{i:05d}_copy.png"
            (images / dup).write_bytes((images / name).read_bytes())
            rows.append((f"images/{dup}", study_label, group))
    corrupt = _write_corrupt_files(images, rows)
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)
    return DemoDataset("xray", out, out / "manifest.csv", n, corrupt)


def _write_corrupt_files(images: Path, rows: list[tuple[str, str, str]]) -> int:
    """Files a real export contains now and then: truncated, empty, or not images at all."""
    good = (images / rows[0][0].split("/", 1)[1]).read_bytes()
    bad = {
        "broken_truncated.png": good[: len(good) // 2],
        "broken_empty.png": b"",
        "broken_text.png": b"patient refused imaging\n",
        "broken_page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
    }
    for name, data in bad.items():
        (images / name).write_bytes(data)
        rows.append((f"images/{name}", "normal", "P9999"))
    return len(bad)


# --- claims ------------------------------------------------------------------------------


def render_claim(label: str, rng: np.random.Generator, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """One vehicle-photo-like RGB image with the given damage."""
    w, h = size
    sky = np.linspace(rng.uniform(150, 220), rng.uniform(90, 160), h)[:, None, None]
    tint = rng.uniform(0.85, 1.1, 3)[None, None, :]
    canvas = np.broadcast_to(sky * tint, (h, w, 3)).copy()
    horizon = int(h * rng.uniform(0.55, 0.7))
    canvas[horizon:] = rng.uniform(70, 110)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cw, ch = w * rng.uniform(0.6, 0.8), h * rng.uniform(0.3, 0.4)
    x0, y0 = (w - cw) / 2 + rng.normal(0, w * 0.04), horizon - ch * rng.uniform(0.6, 0.8)
    color = tuple(int(c) for c in rng.integers(30, 230, 3))
    body = (x0, y0, x0 + cw, y0 + ch)
    draw.rounded_rectangle(body, radius=int(ch * 0.25), fill=color)
    roof = (x0 + cw * 0.2, y0 - ch * 0.45, x0 + cw * 0.78, y0 + ch * 0.1)
    draw.rounded_rectangle(roof, radius=int(ch * 0.2), fill=color)
    window = (roof[0] + cw * 0.05, roof[1] + ch * 0.08, roof[2] - cw * 0.05, y0)
    glass = tuple(int(c) for c in rng.integers(120, 190, 3))
    draw.rectangle(window, fill=glass)
    for wx in (x0 + cw * 0.2, x0 + cw * 0.8):
        r = ch * 0.28
        draw.ellipse((wx - r, y0 + ch - r, wx + r, y0 + ch + r), fill=(20, 20, 20))
    _DAMAGE[label](draw, img, rng, body, window)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))


Box = tuple[float, float, float, float]


def _no_damage(draw: ImageDraw.ImageDraw, img: Image.Image, rng: np.random.Generator, body: Box, window: Box) -> None:
    return None


def _scratch(draw: ImageDraw.ImageDraw, img: Image.Image, rng: np.random.Generator, body: Box, window: Box) -> None:
    x0, y0, x1, y1 = body
    for _ in range(int(rng.integers(1, 4))):
        sx, sy = rng.uniform(x0 + 4, x1 - 4), rng.uniform(y0 + 3, y1 - 6)
        length, angle = rng.uniform(0.25, 0.45) * (x1 - x0), rng.uniform(-0.5, 0.5)
        shade = int(rng.choice([rng.integers(200, 255), rng.integers(0, 50)]))
        width = max(2, round((x1 - x0) / 60))
        draw.line((sx, sy, sx + length * np.cos(angle), sy + length * np.sin(angle)), fill=(shade,) * 3, width=width)


def _dent(draw: ImageDraw.ImageDraw, img: Image.Image, rng: np.random.Generator, body: Box, window: Box) -> None:
    x0, y0, x1, y1 = body
    w, h = img.size
    cx, cy = rng.uniform(x0 + 0.15 * (x1 - x0), x1 - 0.15 * (x1 - x0)), rng.uniform(y0 + 4, y1 - 4)
    s = rng.uniform(0.08, 0.12) * (x1 - x0)
    shade = _gaussian(h, w, cy - s * 0.4, cx - s * 0.4, s, s) - _gaussian(h, w, cy + s * 0.4, cx + s * 0.4, s, s)
    arr = np.asarray(img).astype(np.float32) + rng.uniform(45, 70) * shade[:, :, None]
    img.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))


def _broken_glass(
    draw: ImageDraw.ImageDraw, img: Image.Image, rng: np.random.Generator, body: Box, window: Box
) -> None:
    wx0, wy0, wx1, wy1 = window
    cx, cy = rng.uniform(wx0 + 3, wx1 - 3), rng.uniform(wy0 + 2, wy1 - 2)
    for angle in rng.uniform(0, 2 * np.pi, int(rng.integers(4, 8))):
        length = rng.uniform(0.3, 0.7) * (wx1 - wx0)
        ex = np.clip(cx + length * np.cos(angle), wx0, wx1)
        ey = np.clip(cy + length * np.sin(angle), wy0, wy1)
        draw.line((cx, cy, ex, ey), fill=(235, 235, 235), width=max(2, round((wx1 - wx0) / 40)))


_DAMAGE: dict[str, Callable[..., None]] = {
    "none": _no_damage,
    "scratch": _scratch,
    "dent": _dent,
    "broken_glass": _broken_glass,
}


def _generate_claims(out: Path, n: int | None, seed: int, size: int | None) -> DemoDataset:
    n = n or 600
    for i in range(n):
        rng = _rng(seed, i)
        label = _pick_label(rng, CLAIMS_CLASSES)
        side = size or int(rng.choice([128, 160, 192]))
        image = render_claim(label, rng, (side, int(side * 0.75)))
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"claim{i:05d}.jpg", quality=int(rng.integers(80, 95)))
    return DemoDataset("claims", out, out, n, 0)


def _generate_garments(out: Path, n: int | None, seed: int, size: int | None) -> DemoDataset:
    n = write_garments(out, n or 20_000, seed, size or 28)
    return DemoDataset("garments", out, out, n, 0)


GENERATORS: dict[str, Callable[[Path, int | None, int, int | None], DemoDataset]] = {
    "xray": _generate_xray,
    "claims": _generate_claims,
    "garments": _generate_garments,
}

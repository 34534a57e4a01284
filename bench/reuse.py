"""Does the reuse check find copies of earlier photos, and leave distinct photos alone? Generated claims photos
(640x480 JPEG; or chest X-rays, 512 px grey PNG, with `--data xray`; or garment scans at SIZE px, grey PNG, with
`--data garments`: small images, where a copy has few pixels to differ by) are decoded as a model at SIZE px sees
them; each gets a copy that was resized (30-80 %), recompressed (JPEG quality 60-95), cropped (2-10 % off each axis,
anywhere), mirrored, or resized by 0.5-2x and saved as JPEG at quality 70 (`resized-q70`, the copy of a small image
re-posted elsewhere), and the same number of distinct images of the same classes are drawn. Recall: copies
matched to their own original; false matches: distinct images matched to any original. The check is the one
scoring runs (`HashTable.matches`: sha256, pHash of the image and its mirror image, crop views of the layout).
Then the cost of one check against a history of a million images (random hashes and layouts).

    python bench/reuse.py [--n 400] [--size 128] [--data claims|xray|garments] [--history 1000000]

Goals: recall >= 0.95 for every kind of copy, false matches <= 1 % (issue 12); for `resized-q70` copies of small
images (`--data garments --size 28|64|128`) recall >= 0.95 and no false match (issue 27).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnn.data.demo import render_claim, render_xray
from cnn.data.garments import GARMENT_CLASSES, render_garment
from cnn.io.decode import DecodeSpec, decode_bytes
from cnn.similarity.fingerprints import HASH_SIZE, LAYOUT_RMS, crop_views, layouts, phashes
from cnn.similarity.reuse import HashTable
from cnn.similarity.tolerance import NEAR_BITS, Tolerance

CLASSES = {
    "claims": ["none", "scratch", "dent", "broken_glass"],
    "xray": ["normal", "nodule", "opacity"],
    "garments": GARMENT_CLASSES,
}
KINDS = ["resized", "recompressed", "cropped", "mirrored", "resized-q70"]


def _jpeg(picture: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _stored(picture: Image.Image, data: str) -> bytes:
    """An original as its source keeps it: small garment scans as PNG, photos and X-rays as JPEG at quality 90."""
    if data != "garments":
        return _jpeg(picture)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _copy(picture: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    w, h = picture.size
    if kind == "resized":
        f = rng.uniform(0.3, 0.8)
        picture = picture.resize((int(w * f), int(h * f)))
    elif kind == "cropped":
        f = rng.uniform(0.02, 0.10)
        dx, dy = int(w * f * rng.uniform()), int(h * f * rng.uniform())
        picture = picture.crop((dx, dy, w - int(w * f) + dx, h - int(h * f) + dy))
    elif kind == "mirrored":
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif kind == "resized-q70":
        f = rng.uniform(0.5, 2.0)
        return _jpeg(picture.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BICUBIC), 70)
    return _jpeg(picture, int(rng.integers(60, 96)))


def _original(data: str, i: int, seed: int, size: int) -> Image.Image:
    classes = CLASSES[data]
    rng = np.random.default_rng([seed, i])
    if data == "garments":
        return Image.fromarray(render_garment(classes[i % len(classes)], rng, size))
    if data == "claims":
        return render_claim(classes[i % len(classes)], rng, (640, 480))
    return Image.fromarray((render_xray(classes[i % len(classes)], rng, 512) * 255).astype(np.uint8))


def _table(ids: list[str], images: np.ndarray) -> HashTable:
    plain, mirrored = phashes(images)
    grid = [bytes(v) for v in layouts(images)]
    return HashTable(pd.DataFrame({"image_id": ids, "phash": plain, "phash_mirror": mirrored, "layout": grid}))


def _found(table: HashTable, images: np.ndarray, prefix: str, tolerance: Tolerance) -> list:
    hashes, _ = phashes(images)
    views = crop_views(images)
    return table.matches([f"{prefix}{i}" for i in range(len(images))], hashes, [""] * len(images), tolerance, views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--data", choices=sorted(CLASSES), default="claims")
    args = parser.parse_args()
    spec = DecodeSpec(channels=3 if args.data == "claims" else 1, size=args.size)
    originals = [_original(args.data, i, 7, args.size) for i in range(args.n)]
    kinds = [KINDS[i % len(KINDS)] for i in range(args.n)]
    decoded = np.stack([decode_bytes(_stored(p, args.data), spec).array for p in originals])
    copies = np.stack(
        [
            decode_bytes(_copy(p, k, np.random.default_rng([9, i])), spec).array
            for i, (p, k) in enumerate(zip(originals, kinds))
        ]
    )
    others = [_original(args.data, i, 8, args.size) for i in range(args.n)]
    others = np.stack([decode_bytes(_stored(p, args.data), spec).array for p in others])
    table = _table([f"o{i}" for i in range(args.n)], decoded)
    start = time.perf_counter()
    tolerance = Tolerance.calibrate(table.rows)  # as a version's reference calibrates it on its training images
    found = _found(table, copies, "c", tolerance)
    checked = 1000 * (time.perf_counter() - start) / args.n
    right = np.array([m is not None and m.row == i for i, m in enumerate(found)])
    false = np.array([m is not None for m in _found(table, others, "x", tolerance)])
    print(
        f"{args.n} {args.data} originals at {args.size} px: pHash {HASH_SIZE * HASH_SIZE} bits, layout views; near "
        f"within {tolerance.bits(args.size)} bits (photos {NEAR_BITS}) or {tolerance.rms(args.size):.1f} RMS (photos "
        f"{LAYOUT_RMS}), calibrated on the originals; {checked:.2f} ms per image to hash and check"
    )
    for kind in KINDS:
        picked = np.array(kinds) == kind
        how = {m.measure for m, p in zip(found, picked) if p and m is not None}
        print(f"  recall, {kind:<13} {right[picked].mean():6.3f}   ({picked.sum()} copies; found by {sorted(how)})")
    print(f"  recall, all           {right.mean():6.3f}")
    print(f"  false matches         {false.mean():6.3f}   (distinct images of the same classes)")
    rng = np.random.default_rng(0)
    hexes = [bytes(rng.integers(0, 256, HASH_SIZE * HASH_SIZE // 8, dtype=np.uint8)).hex() for _ in range(args.history)]
    width = layouts(decoded[:1]).shape[1]
    grid = [bytes(rng.integers(0, 256, width, dtype=np.uint8)) for _ in range(args.history)]
    history = pd.DataFrame(
        {"image_id": [f"h{i}" for i in range(args.history)], "phash": hexes, "phash_mirror": hexes, "layout": grid}
    )
    start = time.perf_counter()
    big = HashTable(history)  # the layout index as History.extend keeps it (HNSW above EXACT_LIMIT)
    built = time.perf_counter() - start
    start = time.perf_counter()
    _found(big, copies, "c", tolerance)
    per_image = 1000 * (time.perf_counter() - start) / args.n
    print(f"history of {args.history:,} images: table built in {built:.1f} s (History keeps it); one check "
          f"{per_image:.2f} ms per image (a shard's images searched together)")  # fmt: skip


if __name__ == "__main__":
    main()

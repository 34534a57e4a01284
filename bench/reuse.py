"""Does the reuse check find copies of earlier photos, and leave distinct photos alone? Generated claims photos
(640x480 JPEG) are decoded as a model at SIZE px sees them; each gets a copy that was resized (30-80 %),
recompressed (JPEG quality 60-95), cropped (2-10 % off each side, anywhere) or mirrored, and the same number of
distinct photos of the same classes are drawn. Recall: copies matched to their own original; false matches:
distinct photos matched to any original. Then the cost of one check against a history of a million images.

    python bench/reuse.py [--n 400] [--size 128] [--history 1000000]

Goal (issue 12): recall >= 0.95 for every kind of copy, false matches <= 1 %.
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
from cnn.decode import DecodeSpec, decode_bytes
from cnn.demo_data import render_claim
from cnn.neighbours import HASH_SIZE, NEAR_BITS, HashTable, phashes

CLASSES = ["none", "scratch", "dent", "broken_glass"]
KINDS = ["resized", "recompressed", "cropped", "mirrored"]


def _jpeg(picture: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
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
    return _jpeg(picture, int(rng.integers(60, 96)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--near-bits", type=int, default=NEAR_BITS)
    args = parser.parse_args()
    spec = DecodeSpec(channels=3, size=args.size)
    originals = [render_claim(CLASSES[i % 4], np.random.default_rng([7, i]), (640, 480)) for i in range(args.n)]
    kinds = [KINDS[i % 4] for i in range(args.n)]
    decoded = np.stack([decode_bytes(_jpeg(p), spec).array for p in originals])
    copies = np.stack(
        [
            decode_bytes(_copy(p, k, np.random.default_rng([9, i])), spec).array
            for i, (p, k) in enumerate(zip(originals, kinds))
        ]
    )
    others = np.stack(
        [decode_bytes(_jpeg(render_claim(CLASSES[i % 4], np.random.default_rng([8, i]), (640, 480))), spec).array
         for i in range(args.n)]
    )  # fmt: skip
    plain, mirrored = phashes(decoded)
    table = HashTable(
        pd.DataFrame({"image_id": [f"o{i}" for i in range(args.n)], "phash": plain, "phash_mirror": mirrored})
    )
    copy_hashes, _ = phashes(copies)
    other_hashes, _ = phashes(others)
    found = table.matches([f"c{i}" for i in range(args.n)], copy_hashes, [""] * args.n, args.near_bits)
    right = np.array([m is not None and m.row == i for i, m in enumerate(found)])
    false = np.array(
        [m is not None for m in table.matches([f"x{i}" for i in range(args.n)], other_hashes, [""] * args.n)]
    )
    print(f"{args.n} originals at {args.size} px, pHash {HASH_SIZE * HASH_SIZE} bits, near <= {args.near_bits} bits")
    for kind in KINDS:
        picked = np.array(kinds) == kind
        print(f"  recall, {kind:<13} {right[picked].mean():6.3f}   ({picked.sum()} copies)")
    print(f"  recall, all           {right.mean():6.3f}")
    print(f"  false matches         {false.mean():6.3f}   (distinct photos of the same classes)")
    rng = np.random.default_rng(0)
    hexes = [bytes(rng.integers(0, 256, HASH_SIZE * HASH_SIZE // 8, dtype=np.uint8)).hex() for _ in range(args.history)]
    history = pd.DataFrame({"image_id": [f"h{i}" for i in range(args.history)], "phash": hexes, "phash_mirror": hexes})
    start = time.perf_counter()
    big = HashTable(history)
    built = time.perf_counter() - start
    start = time.perf_counter()
    big.matches([f"c{i}" for i in range(args.n)], copy_hashes, [""] * args.n)
    per_image = 1000 * (time.perf_counter() - start) / args.n
    print(f"history of {args.history:,} images: table built in {built:.1f} s; one check {per_image:.2f} ms per image "
          f"(a shard's images searched together)")  # fmt: skip


if __name__ == "__main__":
    main()

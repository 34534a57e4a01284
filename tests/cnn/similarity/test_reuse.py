"""The reuse check: exact, near, cropped, mirrored and semantic copies, never a file of itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cnn.similarity import fingerprints
from cnn.similarity import history as scored_history
from cnn.similarity.fingerprints import crop_views, phashes
from cnn.similarity.index import VectorIndex
from cnn.similarity.reuse import HashTable, Lookup
from cnn.similarity.tolerance import CALIBRATE_FROM, Tolerance
from tests.cnn.similarity.images import claims, hash_table, letterbox, photo, shown


def test_copies_are_found_exactly_nearly_cropped_and_mirrored_and_a_file_is_never_a_copy_of_itself() -> None:
    photos = claims(range(20))
    table = hash_table(np.stack([shown(p) for p in photos]))
    smaller = photos[3].resize((60, 45)).resize((160, 120))
    cropped = photos[7].crop((12, 0, 160, 110))  # 7.5 % off the left, 8 % off the bottom
    queries = np.stack(
        [shown(photos[0]), shown(smaller), shown(photos[5])[:, ::-1], shown(cropped), shown(claims([99])[0])]
    )
    hashes, _ = phashes(queries)
    views = crop_views(queries)
    found = table.matches(["id0", "new1", "new2", "new3", "new4"], hashes, [""] * 5, views=views)
    assert (found[0].kind, found[0].row) == ("exact", 0)
    assert (found[1].kind, found[1].row) == ("near", 3)
    assert (found[2].kind, found[2].row, found[2].measure) == ("near", 5, "phash_bits")  # a mirrored copy
    assert (found[3].kind, found[3].row, found[3].measure) == ("near", 7, "layout_rms")  # a cropped copy
    assert found[3].value <= fingerprints.LAYOUT_RMS
    assert found[4] is None  # another photo of the same kind
    again = table.matches(["id0"], hashes[:1], ["k0"], views=views[:1])  # the same file scored again, own path
    assert again == [None]
    assert table.matches(["new3"], hashes[3:4], [""], views=views[3:4], before=[7]) == [None]  # rows before 7 only


def test_an_earlier_shard_of_the_same_run_is_searched(tmp_path: Path) -> None:
    photos = claims(range(3))
    first = np.stack([shown(p) for p in photos])
    empty = hash_table(first[:0])
    lookup = Lookup(empty, VectorIndex.build(np.zeros((0, 4), np.float32)), empty)
    earlier = lookup.annotate(
        lookup.copies(["a", "b", "c"], ["/a", "/b", "/c"], first, ['{"claim": "C1"}'] * 3), ["dent"] * 3, None
    )
    assert earlier["duplicate_kind"].isna().all()
    later = np.stack([shown(photos[1].crop((8, 6, 160, 120)))])
    alone = lookup.annotate(lookup.copies(["d"], ["/d"], later), ["dent"], None)
    with_run = lookup.with_run(earlier[scored_history.HISTORY_COLUMNS[:-1]])
    noted = with_run.annotate(with_run.copies(["d"], ["/d"], later), ["dent"], None)
    assert alone["duplicate_kind"].tolist() == [None] and noted["duplicate_kind"].tolist() == ["near"]
    assert '"source": "this run"' in noted["duplicate_of"].iloc[0] and '"claim": "C1"' in noted["duplicate_of"].iloc[0]


def test_the_same_photo_twice_in_one_shard_is_a_copy_of_the_first(tmp_path: Path) -> None:
    image = letterbox(photo(1))
    empty = HashTable(pd.DataFrame({"image_id": [], "phash": [], "phash_mirror": [], "label": []}))
    lookup = Lookup(empty, VectorIndex.build(np.zeros((0, 4), np.float32)), empty)
    images = np.stack([image, letterbox(photo(2)), image[:, ::-1]])
    ids = ['{"claim": "A1"}', '{"claim": "B2"}', '{"claim": "C3"}']
    notes = lookup.annotate(lookup.copies(["x", "y", "z"], ["/a", "/b", "/c"], images, ids), ["none"] * 3, None)
    assert notes["duplicate_kind"].tolist()[:2] == [None, None] and notes["duplicate_kind"].iloc[2] == "near"
    assert '"claim": "A1"' in notes["duplicate_of"].iloc[2] and '"source": "this run"' in notes["duplicate_of"].iloc[2]


def test_a_small_image_resized_and_saved_as_jpeg_is_found_and_its_classmates_are_not() -> None:
    """At 28 px a copy resized by 0.5-2x and saved at JPEG quality 70 moves tens of hash bits: the tolerances grow
    for small images (the photo tolerances alone missed these copies), still short of distinct images of a class."""
    import io

    from PIL import Image

    from cnn.data.garments import render_garment
    from cnn.io.decode import DecodeSpec, decode_bytes

    spec = DecodeSpec(channels=1, size=28)

    def decoded(image: Image.Image, fmt: str) -> np.ndarray:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 70} if fmt == "JPEG" else {}))
        return decode_bytes(buffer.getvalue(), spec).array

    scans = [Image.fromarray(render_garment("shirt", np.random.default_rng([7, i]))) for i in range(CALIBRATE_FROM)]
    table = hash_table(np.stack([decoded(o, "PNG") for o in scans]))  # a version's training images
    originals = scans[:12]
    factors = [0.6, 0.8, 1.5, 2.0]  # at exactly 0.5x (14 px left of 28) half the copies are missed: docs/similarity.md
    copies = np.stack([decoded(o.resize((round(28 * f), round(28 * f))), "JPEG") for o in originals for f in factors])
    others = np.stack([decoded(Image.fromarray(render_garment("shirt", np.random.default_rng([8, i]))), "PNG")
                       for i in range(24)])  # fmt: skip

    def found(images: np.ndarray, tolerance: Tolerance) -> list:
        hashes, _ = phashes(images)
        ids = [f"q{i}" for i in range(len(images))]
        return table.matches(ids, hashes, [""] * len(images), tolerance, crop_views(images))

    def right(tolerance: Tolerance) -> int:
        rows = [m.row if m is not None else None for m in found(copies, tolerance)]
        return sum(r == i // len(factors) for i, r in enumerate(rows))

    calibrated = Tolerance.calibrate(table.rows)  # distinct garments differ a lot: the tolerances may grow
    assert calibrated.bits(28) > Tolerance().bits(28) and calibrated.bits(64) == Tolerance().bits(64)
    assert Tolerance.calibrate(table.rows.head(CALIBRATE_FROM - 1)) == Tolerance()  # too few to tell
    assert right(calibrated) >= 0.9 * len(copies) > right(Tolerance())  # the photo tolerances missed them
    assert found(others, calibrated) == [None] * len(others)


def test_small_images_that_are_alike_keep_the_photo_tolerances() -> None:
    """Distinct generated X-rays at 32 px differ by little more than noise: calibrated on them the tolerances stay
    where they are for photos, so distinct X-rays are not called copies of each other."""
    from PIL import Image

    from cnn.data.demo import render_xray

    def at_32(i: int) -> np.ndarray:  # as the decoder reduces a 128 px X-ray for a 32 px model
        image = Image.fromarray((render_xray("normal", np.random.default_rng([5, i]), 128) * 255).astype(np.uint8))
        return np.asarray(image.resize((32, 32), Image.Resampling.LANCZOS))[:, :, None]

    table = hash_table(np.stack([at_32(i) for i in range(CALIBRATE_FROM)]))
    calibrated = Tolerance.calibrate(table.rows)
    assert calibrated.bits(32) < 20 and calibrated.rms(32) < 4.0
    assert Tolerance.from_dict({**calibrated.to_dict(), "other": 1}) == calibrated  # as reuse.json keeps it
    assert Tolerance.from_dict({}) == Tolerance()  # a version registered before calibration: the photo tolerances

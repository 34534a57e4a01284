"""The reuse check: exact, near, cropped, mirrored and semantic copies, never a file of itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cnn.data.demo import render_claim
from cnn.similarity import fingerprints
from cnn.similarity import history as scored_history
from cnn.similarity.fingerprints import crop_views, layouts, phashes
from cnn.similarity.index import VectorIndex
from cnn.similarity.reuse import HashTable, Lookup


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    return np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(small).resize((64, 48)), dtype=np.uint8)


def _letterbox(image: np.ndarray, size: int = 64) -> np.ndarray:
    """As the decoder pads: black bars around the content."""
    out = np.zeros((size, size, 3), np.uint8)
    top = (size - image.shape[0]) // 2
    out[top : top + image.shape[0], : image.shape[1]] = image
    return out


def _claims(seeds: range | list[int]) -> list[Image.Image]:
    return [render_claim("dent", np.random.default_rng(seed), (160, 120)) for seed in seeds]


def _shown(photo: Image.Image) -> np.ndarray:
    """As a model at 64 px sees it: long side 64, letterboxed."""
    w, h = photo.size
    return _letterbox(np.asarray(photo.resize((64, round(64 * h / w)))))


def _table(images: np.ndarray, prefix: str = "id") -> HashTable:
    plain, mirrored = phashes(images)
    rows = pd.DataFrame({"image_id": [f"{prefix}{i}" for i in range(len(images))], "phash": plain})
    grid = [bytes(v) for v in layouts(images)]
    return HashTable(rows.assign(phash_mirror=mirrored, layout=grid, path_key=[f"k{i}" for i in range(len(images))]))


def test_copies_are_found_exactly_nearly_cropped_and_mirrored_and_a_file_is_never_a_copy_of_itself() -> None:
    photos = _claims(range(20))
    table = _table(np.stack([_shown(p) for p in photos]))
    smaller = photos[3].resize((60, 45)).resize((160, 120))
    cropped = photos[7].crop((12, 0, 160, 110))  # 7.5 % off the left, 8 % off the bottom
    queries = np.stack(
        [_shown(photos[0]), _shown(smaller), _shown(photos[5])[:, ::-1], _shown(cropped), _shown(_claims([99])[0])]
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
    photos = _claims(range(3))
    first = np.stack([_shown(p) for p in photos])
    empty = _table(first[:0])
    lookup = Lookup(empty, VectorIndex.build(np.zeros((0, 4), np.float32)), empty)
    earlier = lookup.annotate(
        lookup.copies(["a", "b", "c"], ["/a", "/b", "/c"], first, ['{"claim": "C1"}'] * 3), ["dent"] * 3, None
    )
    assert earlier["duplicate_kind"].isna().all()
    later = np.stack([_shown(photos[1].crop((8, 6, 160, 120)))])
    alone = lookup.annotate(lookup.copies(["d"], ["/d"], later), ["dent"], None)
    with_run = lookup.with_run(earlier[scored_history.HISTORY_COLUMNS[:-1]])
    noted = with_run.annotate(with_run.copies(["d"], ["/d"], later), ["dent"], None)
    assert alone["duplicate_kind"].tolist() == [None] and noted["duplicate_kind"].tolist() == ["near"]
    assert '"source": "this run"' in noted["duplicate_of"].iloc[0] and '"claim": "C1"' in noted["duplicate_of"].iloc[0]


def test_the_same_photo_twice_in_one_shard_is_a_copy_of_the_first(tmp_path: Path) -> None:
    photo = _letterbox(_photo(1))
    empty = HashTable(pd.DataFrame({"image_id": [], "phash": [], "phash_mirror": [], "label": []}))
    lookup = Lookup(empty, VectorIndex.build(np.zeros((0, 4), np.float32)), empty)
    images = np.stack([photo, _letterbox(_photo(2)), photo[:, ::-1]])
    ids = ['{"claim": "A1"}', '{"claim": "B2"}', '{"claim": "C3"}']
    notes = lookup.annotate(lookup.copies(["x", "y", "z"], ["/a", "/b", "/c"], images, ids), ["none"] * 3, None)
    assert notes["duplicate_kind"].tolist()[:2] == [None, None] and notes["duplicate_kind"].iloc[2] == "near"
    assert '"claim": "A1"' in notes["duplicate_of"].iloc[2] and '"source": "this run"' in notes["duplicate_of"].iloc[2]

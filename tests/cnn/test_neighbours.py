"""Embeddings, the similar-case index, the reuse check and the version's history."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cnn.data.demo import render_claim
from cnn.infer.predictor import Predictor, _fuse_conv_bn
from cnn.model.contract import ModelContract
from cnn.model.networks import create_model, list_models
from cnn.model.run import FitResult
from cnn.similarity import fingerprints, reference
from cnn.similarity import history as scored_history
from cnn.similarity import index as vector_index
from cnn.similarity.fingerprints import crop_views, layouts, phashes
from cnn.similarity.history import History
from cnn.similarity.index import VectorIndex
from cnn.similarity.reference import Reference, build_reference
from cnn.similarity.reuse import HashTable, Lookup


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_its_embedding_in_the_same_pass(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 3, 3).eval()
    contract = ModelContract(name, ["a", "b", "c"], 3, 64, "pad", [0.5] * 3, [0.25] * 3)
    predictor = Predictor(model, contract, torch.device("cpu"))
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    probs, vectors = predictor.predict_with_embeddings(images, batch_size=2)
    assert np.allclose(probs, predictor.predict_arrays(images), atol=1e-5)
    head = dict(model.named_modules())[[n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]]
    assert vectors.shape == (5, head.in_features) and np.isfinite(vectors).all()
    fused = Predictor(_fuse_conv_bn(model), contract, torch.device("cpu"), channels_last=True)
    assert np.allclose(fused.predict_with_embeddings(images)[1], vectors, atol=1e-3)  # scoring's folded model


def test_the_index_is_exact_when_small_and_hnsw_when_large(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(0, 1, (300, 16)).astype(np.float32)
    exact = VectorIndex.build(vectors)
    similarity, ids = exact.search(vectors[:5], 3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(similarity[:, 0], 1.0, atol=1e-5)
    assert vector_index.exact_limit(512) == vector_index.exact_limit(128) // 4  # exact search costs vectors x dims
    monkeypatch.setattr(vector_index, "EXACT_LIMIT", 25)  # 200 vectors of 16 dimensions
    grown = exact.add(rng.normal(0, 1, (50, 16)).astype(np.float32))  # past the limit: rebuilt as HNSW
    assert len(grown) == 350 and hasattr(grown.index, "hnsw")
    loaded = VectorIndex.load(grown.save(tmp_path / "i.faiss"))
    assert loaded.search(vectors[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]


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


@pytest.mark.parametrize("channels", [1, 3])
def test_both_perceptual_hashes_are_imagehashs_phash_bit_for_bit(channels: int) -> None:
    """Both hashes from one DCT match imagehash on every shape, from upscaling to reducing 8x, taller or wider than
    the 64 px pHash resizes to, hashed in one call."""
    import imagehash

    rng = np.random.default_rng(channels)
    sides = [(int(rng.integers(17, 90)), int(rng.integers(17, 90))) for _ in range(20)]
    sides += [(int(rng.integers(40, 500)), int(rng.integers(40, 500))) for _ in range(40)]
    images = [np.asarray(p) for p in _claims(range(6))] + [
        rng.integers(1, 256, (h, w, 3), dtype=np.uint8) for h, w in sides + [(96, 80), (200, 131), (200, 133)]
    ]
    images = [image[:, :, :channels] if channels == 3 else image[:, :, :1] for image in images]
    plain, mirrored = fingerprints.region_phashes(images)
    assert phashes(images[0][None]) == ([plain[0]], [mirrored[0]])  # the public call: content first, same hash
    for image, ours, ours_mirrored in zip(images, plain, mirrored):
        picture = Image.fromarray(image[:, :, 0] if channels == 1 else image)
        assert ours == str(imagehash.phash(picture, hash_size=fingerprints.HASH_SIZE)), image.shape
        flipped = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert ours_mirrored == str(imagehash.phash(flipped, hash_size=fingerprints.HASH_SIZE)), image.shape


def test_a_shard_of_images_of_several_shapes_gets_each_its_own_views() -> None:
    photos = _claims(range(3))
    shown = np.stack([_shown(photos[0]), _shown(photos[1].crop((0, 0, 160, 80))), _shown(photos[2])])
    views = crop_views(shown)  # two content shapes: 64 x 48 and 64 x 32
    assert [v.small.shape[:2] for v in views] == [(24, 32), (16, 32), (24, 32)]
    assert all(np.array_equal(v.views, crop_views(image[None])[0].views) for v, image in zip(views, shown))


def test_a_blank_image_is_no_ones_copy_by_layout() -> None:
    blank = np.full((1, 64, 64, 3), 128, np.uint8)
    table = _table(blank)
    found = table.matches(["other"], [""], [""], views=crop_views(blank + 1))
    assert found == [None]


def test_the_semantic_check_is_calibrated_on_the_training_split_and_off_where_embeddings_do_not_separate() -> None:
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 1, (500, 32)).astype(np.float32)
    found = reference.semantic_threshold(spread)
    assert found["semantic_cosine"] is not None and 0.95 <= found["semantic_cosine"] < 1
    collapsed = np.ones((500, 32), np.float32) + rng.normal(0, 1e-4, (500, 32)).astype(np.float32)
    assert reference.semantic_threshold(collapsed)["semantic_cosine"] is None  # a class maps to one point
    photos = np.stack([_shown(p) for p in _claims(range(4))])
    train = _table(photos)
    lookup = Lookup(train.__class__(train.rows.assign(label="dent")), VectorIndex.build(spread[:4]), _table(photos[:0]))
    lookup = replace(lookup, semantic=0.99)
    query = np.stack([_shown(_claims([50])[0]), _shown(_claims([51])[0])])  # other photos ...
    vectors = np.stack([spread[2] * 1.01, rng.normal(0, 1, 32).astype(np.float32)])  # ... one of which embeds as #2
    notes = lookup.annotate(lookup.copies(["q1", "q2"], ["/q1", "/q2"], query), ["dent"] * 2, vectors)
    assert notes["duplicate_kind"].tolist() == ["semantic", None]
    assert '"cosine": 1.0' in notes["duplicate_of"].iloc[0] and '"image_id": "id2"' in notes["duplicate_of"].iloc[0]


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


def test_history_extends_atomically_and_once(tmp_path: Path) -> None:
    history = History(tmp_path / "h")
    assert history.rows().empty and history.index() is None and history.generation() == ""
    rows = pd.DataFrame(
        {"image_id": ["a", "b", "b"], "path_key": ["1", "2", "2"], "label": ["x", "y", "y"], "ids": "{}",
         "phash": "", "phash_mirror": "", "layout": [bytes([i] * 192) for i in range(3)],
         "scored_at": pd.Timestamp("2026-11-30", tz="UTC")}
    )  # fmt: skip
    vectors = np.eye(3, 4, dtype=np.float32)
    assert history.extend(rows, vectors) == 2  # b once
    first = history.generation()
    assert history.extend(rows, vectors) == 0 and history.generation() == first  # nothing new: nothing written
    more = rows.assign(image_id=["c", "a", "d"])
    assert history.extend(more, vectors) == 2
    assert history.rows()["image_id"].tolist() == ["a", "b", "c", "d"] and len(history.index() or []) == 4
    assert len(history.layout_index() or []) == 4  # the layouts' index grows with the rows
    assert [p.name for p in (tmp_path / "h").iterdir() if p.name.startswith("gen-")] == [history.generation()]


def test_the_reference_and_lookup_of_a_trained_model(trained: FitResult, patterns: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    reference = build_reference(run, patterns)
    assert isinstance(reference, Reference) and reference.exists
    rows = reference.rows()
    assert len(rows) == len(reference.vectors()) and set(rows["label"]) == {"checker", "horizontal", "vertical"}
    assert reference.drift().split == "val" and len(reference.drift_embeddings()) > 0
    lookup = Lookup.load(reference, History(tmp_path / "history"))
    from cnn.data.dataset import Dataset
    from cnn.trust.evaluation import split_images

    images, labels, ids = split_images(Dataset(patterns), "test", trained.contract)
    predictor = Predictor.load(run / "best.pt", run / "contract.json")
    probs, vectors = predictor.predict_with_embeddings(images)
    predicted = [trained.contract.classes[i] for i in probs.argmax(axis=1)]
    notes = lookup.annotate(lookup.copies(ids, [f"/t/{i}" for i in ids], images), predicted, vectors)
    assert (notes["neighbour_label"] == predicted).mean() >= 0.8  # neighbours mostly agree with the model
    assert notes["neighbour_agreement"].between(0, 1).all()
    train_images, _, train_ids = split_images(Dataset(patterns), "train", trained.contract)
    copies = lookup.annotate(
        lookup.copies(train_ids[:3], ["/x/1", "/x/2", "/x/3"], train_images[:3]), predicted[:3], vectors[:3]
    )
    assert copies["duplicate_kind"].tolist() == ["exact"] * 3
    assert '"source": "training"' in copies["duplicate_of"].iloc[0]


def test_the_same_photo_twice_in_one_shard_is_a_copy_of_the_first(tmp_path: Path) -> None:
    photo = _letterbox(_photo(1))
    empty = HashTable(pd.DataFrame({"image_id": [], "phash": [], "phash_mirror": [], "label": []}))
    lookup = Lookup(empty, VectorIndex.build(np.zeros((0, 4), np.float32)), empty)
    images = np.stack([photo, _letterbox(_photo(2)), photo[:, ::-1]])
    ids = ['{"claim": "A1"}', '{"claim": "B2"}', '{"claim": "C3"}']
    notes = lookup.annotate(lookup.copies(["x", "y", "z"], ["/a", "/b", "/c"], images, ids), ["none"] * 3, None)
    assert notes["duplicate_kind"].tolist()[:2] == [None, None] and notes["duplicate_kind"].iloc[2] == "near"
    assert '"claim": "A1"' in notes["duplicate_of"].iloc[2] and '"source": "this run"' in notes["duplicate_of"].iloc[2]

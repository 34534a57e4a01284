"""Embeddings, the similar-case index, the reuse check and the version's history."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cnn import neighbours
from cnn.contract import ModelContract
from cnn.inference import Predictor, _fuse_conv_bn
from cnn.models import create_model, list_models
from cnn.neighbours import HashTable, History, Lookup, Reference, VectorIndex, build_reference, phashes
from cnn.train import FitResult


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
    monkeypatch.setattr(neighbours, "EXACT_LIMIT", 200)
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


def test_copies_are_found_exactly_nearly_and_mirrored_and_a_file_is_never_a_copy_of_itself() -> None:
    originals = np.stack([_letterbox(_photo(i)) for i in range(20)])
    plain, mirrored = phashes(originals)
    rows = pd.DataFrame({"image_id": [f"id{i}" for i in range(20)], "phash": plain, "phash_mirror": mirrored})
    table = HashTable(rows.assign(path_key=[f"k{i}" for i in range(20)]))
    from PIL import Image

    smaller = _letterbox(np.asarray(Image.fromarray(_photo(3)).resize((40, 30)).resize((64, 48))))
    queries = np.stack([originals[0], smaller, originals[5][:, ::-1], _letterbox(_photo(99))])
    hashes, _ = phashes(queries)
    found = table.matches(["id0", "new1", "new2", "new3"], hashes, ["", "", "", ""])
    assert (found[0].kind, found[0].row) == ("exact", 0)
    assert (found[1].kind, found[1].row) == ("near", 3)
    assert (found[2].kind, found[2].row) == ("near", 5)  # a mirrored copy
    assert found[3] is None  # another photo
    again = table.matches(["id0"], hashes[:1], ["k0"])  # the same file scored again under its own path
    assert again == [None]


def test_history_extends_atomically_and_once(tmp_path: Path) -> None:
    history = History(tmp_path / "h")
    assert history.rows().empty and history.index() is None and history.generation() == ""
    rows = pd.DataFrame(
        {"image_id": ["a", "b", "b"], "path_key": ["1", "2", "2"], "label": ["x", "y", "y"], "ids": "{}",
         "phash": "", "phash_mirror": "", "scored_at": pd.Timestamp("2026-11-30", tz="UTC")}
    )  # fmt: skip
    vectors = np.eye(3, 4, dtype=np.float32)
    assert history.extend(rows, vectors) == 2  # b once
    first = history.generation()
    assert history.extend(rows, vectors) == 0 and history.generation() == first  # nothing new: nothing written
    more = rows.assign(image_id=["c", "a", "d"])
    assert history.extend(more, vectors) == 2
    assert history.rows()["image_id"].tolist() == ["a", "b", "c", "d"] and len(history.index() or []) == 4
    assert [p.name for p in (tmp_path / "h").iterdir() if p.name.startswith("gen-")] == [history.generation()]


def test_the_reference_and_lookup_of_a_trained_model(trained: FitResult, patterns: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    reference = build_reference(run, patterns)
    assert isinstance(reference, Reference) and reference.exists
    rows = reference.rows()
    assert len(rows) == len(reference.vectors()) and set(rows["label"]) == {"checker", "horizontal", "vertical"}
    assert reference.drift()["split"] == "val" and len(reference.drift_embeddings()) > 0
    lookup = Lookup.load(reference, History(tmp_path / "history"))
    from cnn.dataset import Dataset
    from cnn.evaluation import split_images

    images, labels, ids = split_images(Dataset(patterns), "test", trained.contract)
    predictor = Predictor.load(run / "best.pt", run / "contract.json")
    probs, vectors = predictor.predict_with_embeddings(images)
    predicted = [trained.contract.classes[i] for i in probs.argmax(axis=1)]
    notes = lookup.annotate(ids, [f"/t/{i}" for i in ids], predicted, images, vectors)
    assert (notes["neighbour_label"] == predicted).mean() >= 0.8  # neighbours mostly agree with the model
    assert notes["neighbour_agreement"].between(0, 1).all()
    train_images, _, train_ids = split_images(Dataset(patterns), "train", trained.contract)
    copies = lookup.annotate(train_ids[:3], ["/x/1", "/x/2", "/x/3"], predicted[:3], train_images[:3], vectors[:3])
    assert copies["duplicate_kind"].tolist() == ["exact"] * 3
    assert '"source": "training"' in copies["duplicate_of"].iloc[0]


def test_the_same_photo_twice_in_one_shard_is_a_copy_of_the_first(tmp_path: Path) -> None:
    photo = _letterbox(_photo(1))
    empty = HashTable(pd.DataFrame({"image_id": [], "phash": [], "phash_mirror": [], "label": []}))
    lookup = Lookup(empty, VectorIndex.build(np.zeros((0, 4), np.float32)), empty)
    images = np.stack([photo, _letterbox(_photo(2)), photo[:, ::-1]])
    ids = ['{"claim": "A1"}', '{"claim": "B2"}', '{"claim": "C3"}']
    notes = lookup.annotate(["x", "y", "z"], ["/a", "/b", "/c"], ["none"] * 3, images, None, ids)
    assert notes["duplicate_kind"].tolist()[:2] == [None, None] and notes["duplicate_kind"].iloc[2] == "near"
    assert '"claim": "A1"' in notes["duplicate_of"].iloc[2] and '"source": "this run"' in notes["duplicate_of"].iloc[2]

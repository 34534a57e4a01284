"""A version's reference: the semantic threshold, and the reference and lookup of a trained model."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from cnn.infer.predictor import Predictor
from cnn.model.run import FitResult
from cnn.similarity import reference
from cnn.similarity.history import History
from cnn.similarity.index import VectorIndex
from cnn.similarity.reference import Reference, build_reference
from cnn.similarity.reuse import Lookup
from tests.cnn.similarity.images import claims, hash_table, shown


def test_the_semantic_check_is_calibrated_on_the_training_split_and_off_where_embeddings_do_not_separate() -> None:
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 1, (500, 32)).astype(np.float32)
    found = reference.semantic_threshold(spread)
    assert found["semantic_cosine"] is not None and 0.95 <= found["semantic_cosine"] < 1
    collapsed = np.ones((500, 32), np.float32) + rng.normal(0, 1e-4, (500, 32)).astype(np.float32)
    assert reference.semantic_threshold(collapsed)["semantic_cosine"] is None  # a class maps to one point
    photos = np.stack([shown(p) for p in claims(range(4))])
    train = hash_table(photos)
    lookup = Lookup(
        train.__class__(train.rows.assign(label="dent")), VectorIndex.build(spread[:4]), hash_table(photos[:0])
    )
    lookup = replace(lookup, semantic=0.99)
    query = np.stack([shown(claims([50])[0]), shown(claims([51])[0])])  # other photos ...
    vectors = np.stack([spread[2] * 1.01, rng.normal(0, 1, 32).astype(np.float32)])  # ... one of which embeds as #2
    notes = lookup.annotate(lookup.copies(["q1", "q2"], ["/q1", "/q2"], query), ["dent"] * 2, vectors)
    assert notes["duplicate_kind"].tolist() == ["semantic", None]
    assert '"cosine": 1.0' in notes["duplicate_of"].iloc[0] and '"image_id": "id2"' in notes["duplicate_of"].iloc[0]


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

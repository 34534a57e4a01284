"""Embeddings and the similar-case index (FAISS): exact when small, HNSW when large."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnn.infer.predictor import Predictor, _fuse_conv_bn
from cnn.model.contract import ModelContract
from cnn.model.networks import create_model, list_models
from cnn.similarity import index as vector_index
from cnn.similarity.index import VectorIndex


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


def test_an_index_file_is_checked_before_faiss_allocates_what_it_claims(tmp_path: Path) -> None:
    """A FAISS header whose size field claims a billion vectors is refused by reading 45 bytes, and an index that
    does not match its reference (dimension, rows) is refused too."""
    import struct

    from cnn.similarity.index import IndexFileError, VectorIndex

    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    path = VectorIndex.build(vectors).save(tmp_path / "train.faiss")
    assert len(VectorIndex.load(path, 8, 20)) == 20
    with pytest.raises(IndexFileError, match="expected 21 of 8"):
        VectorIndex.load(path, 8, 21)
    data = bytearray(path.read_bytes())
    data[37:45] = struct.pack("<Q", 10**9 * 8)  # the codes' size field of a flat index
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="more than the file holds"):
        VectorIndex.load(path, 8, 20)

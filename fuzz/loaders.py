"""The registry loaders under fuzzing: any bytes as a version's contract.json load as a valid contract or give a
UserError; any bytes as its FAISS index (`train.faiss`, checked against 8 dimensions and 12 rows) load as that
index or give an IndexFileError, without allocating what a crafted size field claims.

    python fuzz/loaders_fuzz.py contract|index CORPUS_DIR [libFuzzer options]

Seeds: `seeds()` below (a real contract, real flat and HNSW indexes)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cnn.errors import UserError
from cnn.model.contract import ModelContract
from cnn.similarity.index import IndexFileError, VectorIndex

DIM, ROWS = 8, 12
_FOLDER = Path(tempfile.mkdtemp(prefix="cnn-fuzz-"))


def check_contract(data: bytes) -> None:
    path = _FOLDER / "contract.json"
    path.write_bytes(data)
    try:
        contract = ModelContract.load(path)
    except UserError:
        return
    assert contract.problem() == "" and 2 <= len(contract.classes), contract.classes


def check_index(data: bytes) -> None:
    path = _FOLDER / "train.faiss"
    path.write_bytes(data)
    try:
        index = VectorIndex.load(path, DIM, ROWS)
    except IndexFileError:
        return
    assert len(index) == ROWS and index.index.d == DIM


TARGETS = {"contract": check_contract, "index": check_index}


def seeds(target: str) -> dict[str, bytes]:
    """Valid inputs of a target to start from."""
    if target == "contract":
        contract = ModelContract("small_cnn", ["clear", "effusion"], 1, 28, "pad", [0.5], [0.25], dataset="xray")
        return {"contract.json": json.dumps(asdict(contract)).encode()}
    vectors = np.random.default_rng(0).normal(size=(ROWS, DIM)).astype(np.float32)
    out = {}
    for name, index in (("flat.faiss", VectorIndex.build(vectors)), ("l2.faiss", VectorIndex.build(vectors, "l2"))):
        out[name] = index.save(_FOLDER / name).read_bytes()
    import faiss  # imported here: heavy; an HNSW seed needs it directly (small sets build a flat index)

    hnsw = faiss.IndexHNSWFlat(DIM, 4, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(vectors)
    out["hnsw.faiss"] = VectorIndex(hnsw).save(_FOLDER / "hnsw.faiss").read_bytes()
    return out

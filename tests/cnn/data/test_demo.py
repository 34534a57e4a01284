"""Demo data: deterministic, labelled, with the awkward files real exports contain."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from cnn.data.demo import generate
from cnn.errors import UserError


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_xray_is_deterministic_and_has_groups_dicom_and_corrupt_files(tmp_path: Path) -> None:
    a = generate("xray", tmp_path / "a", n=120, seed=1)
    b = generate("xray", tmp_path / "b", n=120, seed=1)
    assert _digest(a.root) == _digest(b.root)
    manifest = pd.read_csv(a.source)
    assert set(manifest["label"]) == {"normal", "nodule", "opacity"}
    assert manifest["group"].value_counts().max() > 1
    assert manifest["path"].str.endswith(".dcm").sum() >= 1
    assert a.corrupt == 4 and manifest["path"].str.contains("broken_").sum() == 4
    counts = manifest["label"].value_counts()
    assert counts["normal"] > counts["opacity"]  # imbalanced


def test_claims_class_folders(tmp_path: Path) -> None:
    made = generate("claims", tmp_path / "c", n=40, seed=0)
    labels = {p.parent.name for p in made.root.rglob("*.jpg")}
    assert labels == {"none", "scratch", "dent", "broken_glass"}
    other = generate("claims", tmp_path / "d", n=40, seed=1)
    assert other.images == 40 and _digest(made.root) != _digest(other.root)


def test_unknown_kind() -> None:
    with pytest.raises(UserError, match="claims, garments, xray"):
        generate("mri", "/tmp/never")


def test_garments_are_deterministic_balanced_small_grayscale_scans(tmp_path: Path) -> None:
    from PIL import Image

    from cnn.data.garments import GARMENT_CLASSES

    a = generate("garments", tmp_path / "a", n=40, seed=3)
    assert _digest(a.root) == _digest(generate("garments", tmp_path / "b", n=40, seed=3).root)
    assert _digest(a.root) != _digest(generate("garments", tmp_path / "c", n=40, seed=4).root)
    assert sorted(p.name for p in a.source.iterdir()) == sorted(GARMENT_CLASSES)
    assert {len(list((a.source / label).glob("*.png"))) for label in GARMENT_CLASSES} == {4}  # balanced
    with Image.open(next((a.source / "coat").glob("*.png"))) as image:
        assert (image.mode, image.size) == ("L", (28, 28))

"""Labelled sources: class folders, split folders (with their aliases), manifests with groups; hidden files and
loose files are not ingested."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from cnn.errors import UserError
from cnn.io.sources import scan_source


def test_class_folders_skip_hidden_files_and_count_loose_ones(write_images: Callable[..., Path]) -> None:
    root = write_images(per_class=2)
    (root / "cat" / ".thumbs.png").write_bytes(b"x")
    (root / "readme.txt").write_text("loose")
    listing = scan_source(root)
    assert listing.layout == "class-folders" and listing.skipped == 1
    assert sorted(listing.files["label"]) == ["cat", "cat", "dog", "dog"] and listing.files["split"].isna().all()


def test_split_folders_by_any_alias(write_images: Callable[..., Path], tmp_path: Path) -> None:
    write_images("src/training", per_class=1)
    write_images("src/validation", per_class=1, seed=1)
    listing = scan_source(tmp_path / "src")
    assert listing.layout == "split-folders" and sorted(set(listing.files["split"])) == ["train", "val"]


def test_a_manifest_resolves_relative_paths_and_keeps_groups(write_images: Callable[..., Path]) -> None:
    root = write_images(per_class=1)
    manifest = root / "m.csv"
    pd.DataFrame(
        {"path": ["cat/cat000.png", "dog/dog000.png"], "label": ["cat", "dog"], "patient": ["p1", "p1"]}
    ).to_csv(manifest, index=False)
    files = scan_source(manifest, group_column="patient").files
    assert files["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    assert files["group"].tolist() == ["p1", "p1"]
    pd.DataFrame({"path": ["cat/cat000.png"], "label": ["cat"], "split": ["holdout"]}).to_csv(manifest, index=False)
    with pytest.raises(UserError, match="split 'holdout' is not one of train, val, test"):
        scan_source(manifest)

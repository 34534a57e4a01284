"""Split assignment: groups and duplicates stay together, labels stratified, same seed same splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cnn.config import SplitFractions
from cnn.data.splits import assign_splits, find_units
from cnn.errors import UserError

ALL = ("train", "val", "test")


def _rows(n_groups: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = ["a", "a", "a", "b", "c"][g % 5]  # imbalanced: a 60%, b 20%, c 20%
        for k in range(int(rng.integers(1, 4))):
            rows.append({"image_id": f"img{g}-{k}", "label": label, "group": f"G{g}", "fixed": None, "allowed": ALL})
    return pd.DataFrame(rows)


def test_groups_never_span_splits() -> None:
    rows = _rows()
    splits, _ = assign_splits(rows, SplitFractions(0.15, 0.15), seed=1)
    per_group = rows.assign(split=splits.to_numpy()).groupby("group")["split"].nunique()
    assert per_group.max() == 1


def test_stratified_by_label() -> None:
    rows = _rows(300)
    splits, _ = assign_splits(rows, SplitFractions(0.2, 0.2), seed=3)
    shares = pd.crosstab(rows["label"], splits.to_numpy(), normalize="index")
    for split, target in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert np.allclose(shares[split], target, atol=0.04), shares


def test_deterministic_in_seed() -> None:
    rows = _rows()
    first, _ = assign_splits(rows, SplitFractions(), seed=7)
    again, _ = assign_splits(rows, SplitFractions(), seed=7)
    other, _ = assign_splits(rows, SplitFractions(), seed=8)
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()


def test_identical_images_share_a_split_across_groups() -> None:
    rows = _rows(60)
    rows.loc[5, "image_id"] = rows.loc[70, "image_id"] = "same-bytes"
    units = find_units(rows["image_id"], rows["group"])
    assert units[5] == units[70]
    splits, _ = assign_splits(rows, SplitFractions(), seed=0)
    linked = set(rows.loc[rows["group"].isin({rows.loc[5, "group"], rows.loc[70, "group"]})].index)
    assert len({splits[i] for i in linked}) == 1


def test_fixed_splits_kept_and_conflicts_resolved_towards_test() -> None:
    rows = _rows(30)
    rows["fixed"] = "train"
    rows["allowed"] = [("train",)] * len(rows)
    rows.loc[0, "fixed"] = "test"
    same_group = rows.index[rows["group"] == rows.loc[0, "group"]]
    splits, moved = assign_splits(rows, SplitFractions(), seed=0)
    assert set(splits[same_group]) == {"test"}
    assert moved == len(same_group) - 1
    assert set(splits.drop(same_group)) == {"train"}


def test_val_carved_from_train_only() -> None:
    rows = _rows(100)
    rows["allowed"] = [("train", "val")] * len(rows)
    splits, _ = assign_splits(rows, SplitFractions(0.2, 0.3), seed=0)
    assert set(splits) == {"train", "val"}
    assert 0.12 < (splits == "val").mean() < 0.28


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (0.6, 0.5), (1.0, 0.0)])
def test_bad_fractions_are_user_errors(val: float, test: float) -> None:
    with pytest.raises(UserError):
        SplitFractions(val, test)

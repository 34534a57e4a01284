"""Stratified, group-aware, deterministic train/val/test assignment.

Rows that share a group (patient, claim) or an image (same sha256) form one unit that lands in one
split. A unit with a fixed split (given by the source, or kept from an earlier ingest) keeps it;
the others are placed greedily, largest first, where their labels are most under-represented.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cnn.choices import SPLITS
from cnn.config import SplitFractions

_PRIORITY = {"test": 0, "val": 1, "train": 2}  # where a unit's members disagree, evaluation wins


def find_units(image_ids: pd.Series, groups: pd.Series) -> np.ndarray:
    """Label each row with a unit number: rows sharing an image_id or a group share a unit."""
    parent = list(range(len(image_ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key_series in (image_ids, groups):
        first: dict[str, int] = {}
        for i, key in enumerate(key_series):
            if key is None or (isinstance(key, float) and np.isnan(key)) or key == "":
                continue
            if key in first:
                a, b = find(i), find(first[key])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[key] = i
    return np.array([find(i) for i in range(len(image_ids))], dtype=np.int64)


def assign_splits(rows: pd.DataFrame, fractions: SplitFractions, seed: int) -> tuple[pd.Series, int]:
    """Return each row's split and how many fixed rows moved to keep a unit in one split.

    `rows` needs columns image_id, label, group, fixed (a split or None) and allowed (a tuple of the
    splits the row may go to when it is not fixed).
    """
    if rows.empty:
        return pd.Series([], dtype=object), 0
    units = find_units(rows["image_id"], rows["group"])
    frame = rows.assign(unit=units)
    fixed_by_unit: dict[int, list[str]] = {}
    for unit, split in zip(units.tolist(), frame["fixed"]):
        if isinstance(split, str):
            fixed_by_unit.setdefault(unit, []).append(split)
    unit_split: dict[int, str] = {}
    moved = 0
    for unit in sorted(fixed_by_unit):
        fixed = fixed_by_unit[unit]
        choice = min(fixed, key=_PRIORITY.__getitem__)
        unit_split[unit] = choice
        moved += sum(1 for s in fixed if s != choice)
    _place_free_units(frame, unit_split, fractions, seed)
    return frame["unit"].map(unit_split).rename("split"), moved


def _place_free_units(frame: pd.DataFrame, unit_split: dict[int, str], fractions: SplitFractions, seed: int) -> None:
    """Greedy stratified placement of the units that have no fixed split, pool by pool (plain dicts over the rows:
    a groupby per unit cost a second per 4,000 single-file units)."""
    rng = np.random.default_rng(seed)
    for allowed, pool in frame.groupby("allowed", sort=True):
        allowed = tuple(allowed)
        shares = fractions.targets(allowed)
        label_totals = {str(k): int(v) for k, v in pool["label"].value_counts().items()}
        counts = {label: dict.fromkeys(allowed, 0.0) for label in label_totals}
        members_of: dict[int, list[str]] = {}  # each free unit's labels, in row order
        for unit, label in zip(pool["unit"].tolist(), pool["label"].tolist()):
            split = unit_split.get(unit)
            if split is None:
                members_of.setdefault(unit, []).append(label)
            elif split in allowed:
                counts[label][split] += 1
        free_units = sorted(members_of)
        order = rng.permutation(len(free_units))
        # Largest units first pack best; the seeded permutation breaks ties deterministically.
        ranked = sorted((free_units[i] for i in order), key=lambda u: -len(members_of[u]))
        rank = {split: -SPLITS.index(split) for split in allowed}  # ties go to the split listed first
        for unit in ranked:
            labels = members_of[unit]
            best, best_key = allowed[0], (-math.inf, 0)
            single = labels[0] if len(labels) == 1 else None  # most units: one file (0 + x is x: the same sums)
            for split in allowed:  # the split this unit's labels are furthest behind their share in
                deficit: float = (
                    shares[split] * label_totals[single] - counts[single][split]
                    if single is not None
                    else sum(shares[split] * label_totals[lb] - counts[lb][split] for lb in labels)
                )
                if (deficit, rank[split]) > best_key:
                    best, best_key = split, (deficit, rank[split])
            unit_split[unit] = best
            for label in labels:
                counts[label][best] += 1

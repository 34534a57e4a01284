"""What a version scored: extended atomically and once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cnn.similarity.history import History


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

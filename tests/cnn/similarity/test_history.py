"""What a version scored: extended atomically and once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cnn.similarity.history import History
from cnn.similarity.index import VectorIndex


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
    # the second run's 2 rows were merged into the first's segment (a binary counter's carry): one segment, the
    # first run's folder gone
    assert [p.name for p in (tmp_path / "h").iterdir() if p.name.startswith("seg-")] == [history.generation()]


def _rows(first: int, n: int) -> tuple[pd.DataFrame, np.ndarray]:
    ids = [f"id{i:05d}" for i in range(first, first + n)]
    rows = pd.DataFrame(
        {"image_id": ids, "path_key": ids, "label": "x", "ids": "{}", "phash": "", "phash_mirror": "",
         "layout": [bytes([i % 256] * 192) for i in range(first, first + n)],
         "scored_at": pd.Timestamp("2026-11-30", tz="UTC")}
    )  # fmt: skip
    vectors = np.random.default_rng(first).standard_normal((n, 8)).astype(np.float32)
    return rows, vectors


def test_nights_append_segments_searched_as_one_and_merged_like_a_binary_counter(tmp_path: Path) -> None:
    history = History(tmp_path / "h")
    every = []
    for night in range(7):  # 7 nights of 10 rows: segments of 40, 20 and 10 rows (7 = 0b111)
        rows, vectors = _rows(10 * night, 10)
        assert history.extend(rows, vectors) == 10
        every.append(vectors)
    segments = history.generation().split("+")
    assert len(segments) == 3
    assert [len(pd.read_parquet(tmp_path / "h" / s / "rows.parquet")) for s in segments] == [40, 20, 10]
    assert history.rows()["image_id"].tolist() == [f"id{i:05d}" for i in range(70)]  # in the order scored
    index, layouts = history.index(), history.layout_index()
    assert index is not None and len(index) == 70 and layouts is not None and len(layouts) == 70
    vectors = np.concatenate(every)
    for row in (0, 45, 69):  # each row's own vector finds it first, whichever segment it is in
        scores, ids = index.search(vectors[row : row + 1], 3)
        assert ids[0, 0] == row and scores[0, 0] > 0.999 and scores[0, 0] >= scores[0, 1] >= scores[0, 2]
    whole = VectorIndex.build(vectors)
    assert (index.search(vectors[:5], 5)[1] == whole.search(vectors[:5], 5)[1]).all()  # as one index would answer
    assert history.extend(*_rows(0, 10)) == 0 and len(history.generation().split("+")) == 3  # seen: nothing written

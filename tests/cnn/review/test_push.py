"""Which rows of a review queue a push sends to Label Studio."""

from __future__ import annotations

import pandas as pd

from cnn.review.push import open_rows


def test_the_same_photo_under_two_paths_is_one_task_the_most_urgent() -> None:
    queue = pd.DataFrame(
        {
            "image_id": ["a", "b", "a", "c"],
            "path": ["/night1/x.png", "/night1/y.png", "/night2/x-copy.png", "/night2/z.png"],
            "model_name": ["m", "m", "m", "other"],
            "model_version": ["1", "1", "1", "1"],
            "urgency": [0.2, 0.5, 0.9, 1.0],
            "reviewed_label": [None, None, None, None],
        }
    )
    rows = open_rows(queue, "m")
    assert rows[["image_id", "path"]].values.tolist() == [["a", "/night2/x-copy.png"], ["b", "/night1/y.png"]]
    answered = queue.assign(reviewed_label=["x", None, None, None])
    assert open_rows(answered, "m")["path"].tolist() == ["/night2/x-copy.png", "/night1/y.png"]

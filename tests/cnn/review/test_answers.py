"""The rule for several reviewers of one image (cnn.review.answers): agreement gives the label, disagreement a
dispute, a ground-truth annotation settles, skipped ones do not count, each reviewer's newest answer counts."""

from __future__ import annotations

from typing import Any

import pandas as pd

from cnn.review.answers import answers
from cnn.review.tasks import NONE_OF_THESE, UNUSABLE


def _annotation(user: int, choice: str, at: str, **extra: Any) -> dict[str, Any]:
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]
    return {"completed_by": user, "result": result, "updated_at": at, **extra}


def _task(image: str, *annotations: dict[str, Any]) -> dict[str, Any]:
    return {"data": {"image_id": image, "model": "xray", "model_version": "3"}, "annotations": list(annotations)}


def test_agreement_dispute_ground_truth_skips_and_second_thoughts() -> None:
    tasks = [
        _task("one", _annotation(7, "normal", "2026-12-01T10:00:00Z")),
        _task("two", _annotation(7, "nodule", "2026-12-01T10:00:00Z"), _annotation(9, "nodule", "2026-12-01T11:00Z")),
        _task("torn", _annotation(7, "nodule", "2026-12-01T10:00:00Z"), _annotation(9, "normal", "2026-12-01T11:00Z")),
        _task(
            "settled",
            _annotation(7, "nodule", "2026-12-01T10:00:00Z"),
            _annotation(9, "normal", "2026-12-01T11:00:00Z", ground_truth=True),
        ),
        _task("skipped", _annotation(7, "nodule", "2026-12-01T10:00:00Z", was_cancelled=True)),
        _task(
            "changed",
            _annotation(7, "nodule", "2026-12-01T10:00:00Z"),
            _annotation(7, "normal", "2026-12-02T10:00:00Z"),
        ),
        _task("blurred", _annotation({"id": 7, "email": "x@y"}, UNUSABLE, "2026-12-01T10:00:00Z")),  # type: ignore[arg-type]
        _task("other", _annotation(7, NONE_OF_THESE, "2026-12-01T10:00:00Z")),
        _task("unknown", _annotation(7, "fracture", "2026-12-01T10:00:00Z")),
        _task("open"),
    ]
    got = answers(tasks, {"xray": ["normal", "nodule"]}).set_index("image_id")
    assert set(got.index) == {"one", "two", "torn", "settled", "changed", "blurred", "other", "unknown"}
    assert got.loc["one", ["reviewed_label", "review_verdict", "reviewed_by"]].tolist() == ["normal", "label", "7"]
    assert got.loc["two", ["reviewed_label", "reviewed_by"]].tolist() == ["nodule", "7,9"]
    assert got.loc["torn", "review_verdict"] == "disputed" and pd.isna(got.loc["torn", "reviewed_label"])
    assert got.loc["settled", "reviewed_label"] == "normal"
    assert got.loc["changed", "reviewed_label"] == "normal" and got.loc["changed", "reviewed_by"] == "7"
    assert got.loc["blurred", "review_verdict"] == "unusable" and got.loc["blurred", "reviewed_by"] == "7"
    assert got.loc["other", "review_verdict"] == "none_of_these" and pd.isna(got.loc["other", "reviewed_label"])
    assert got.loc["unknown", "review_verdict"] == "disputed"  # not a class of the model: not trusted
    assert got.loc["two", "reviewed_at"] == pd.Timestamp("2026-12-01T11:00Z")
    assert "x@y" not in got.to_csv()  # ids only, never an e-mail

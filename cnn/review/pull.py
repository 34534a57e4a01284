"""`cnn review pull`: reviewers' answers from the model's Label Studio project into the review table it was pushed
from (cnn.review.answers states the rule for several reviewers of one image); only answers that are new or changed
are written, so a pull repeated without new work writes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cnn.batch.tables import ANSWER_KEY, REVIEWER_COLUMNS, row_keys
from cnn.frames import among
from cnn.review.answers import VERDICT_COLUMN, answers
from cnn.review.labelstudio import LabelStudio
from cnn.review.tasks import project_title


@dataclass(frozen=True)
class Pulled:
    """The answers a pull found, and those that are new or changed against the review table."""

    answers: pd.DataFrame  # ANSWER_KEY + REVIEWER_COLUMNS, one row per answered task
    changed: pd.DataFrame  # the rows of `answers` to rows of the table that it does not hold yet
    elsewhere: int  # answers to rows this table does not hold (pushed from another table, or since replaced)
    project: int | None  # None: nothing was ever pushed for this model

    def counts(self) -> dict[str, int]:
        verdicts = self.answers[VERDICT_COLUMN].value_counts().to_dict() if len(self.answers) else {}
        return {"answered": len(self.answers), "new or changed": len(self.changed), **verdicts}

    def describe(self, written: int) -> str:
        if self.project is None:
            return "no Label Studio project for this model yet: push its review queue first"
        counts = self.counts()
        said = f"{counts['answered']} answered task(s), {written} new or changed answer(s) written"
        extra = [f"{counts[k]} {k.replace('_', ' ')}" for k in ("disputed", "unusable", "none_of_these") if k in counts]
        if self.elsewhere:
            extra.append(f"{self.elsewhere} for rows this table does not hold")
        return said + (f" ({', '.join(extra)})" if extra else "")


def pull(client: LabelStudio, model_name: str, classes: Sequence[str] | None, queue: pd.DataFrame) -> Pulled:
    """The answers of the model's project, and which of them `queue` (the review table as it is) lacks; with
    `classes`, an answer that is not one of them is disputed."""
    found = client.project(project_title(model_name))
    if found is None:
        empty = answers([])
        return Pulled(empty, empty, 0, None)
    got = answers(client.tasks(int(found["id"])), {model_name: list(classes)} if classes is not None else None)
    held = among(row_keys(got, ANSWER_KEY), row_keys(queue, ANSWER_KEY))
    return Pulled(got, _changed(got.loc[held], queue), int((~held).sum()), int(found["id"]))


def _changed(got: pd.DataFrame, queue: pd.DataFrame) -> pd.DataFrame:
    """The answers that differ from what the table holds for their bytes and version (on any of the rows of those
    bytes: two paths may hold them), or that it does not hold."""
    if got.empty or queue.empty:
        return got.reset_index(drop=True)
    got = got.reset_index(drop=True)
    held = queue.reindex(columns=[*ANSWER_KEY, *REVIEWER_COLUMNS]).reset_index(drop=True)
    keys, held_keys = row_keys(got, ANSWER_KEY), row_keys(held, ANSWER_KEY)
    differs = ~among(keys, held_keys)
    position = pd.Series(np.arange(len(got)), index=keys.to_numpy())
    position = position[~position.index.duplicated(keep="last")]
    answered = held_keys.map(position)  # each held row's answer, if any
    mine = answered.notna().to_numpy()
    at = answered[mine].astype(int).to_numpy()
    for column in REVIEWER_COLUMNS:
        before = _text(held[column], column).to_numpy()[mine]
        after = _text(got[column], column).to_numpy()[at]
        differs[at[before != after]] = True
    return got.loc[differs].reset_index(drop=True)


def _text(values: pd.Series, column: str) -> pd.Series:
    """Values compared as text (a time in UTC ISO form; empty for a missing value), as every sink reads back."""
    if column == "reviewed_at":
        times = pd.to_datetime(values, utc=True, format="ISO8601")
        return times.map(lambda t: "" if pd.isna(t) else t.isoformat())
    return values.astype(object).where(values.notna(), "").astype(str).str.strip()

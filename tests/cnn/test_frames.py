"""among(): membership as pandas' isin answers it, for the kinds of columns the tables hold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cnn.frames import among


@pytest.mark.parametrize(
    "values, candidates",
    [
        (pd.Series(["a", "b", "c", "a"]).astype(str), ["a", "c", "zz"]),  # pandas' Arrow-backed strings
        (pd.Series(["a", "b", "c"], dtype=object), pd.Series(["b"]).astype(str)),  # object against Arrow
        (pd.Index(["k\x1fm\x1f1", "k\x1fm\x1f2"]), pd.Index(["k\x1fm\x1f2"])),  # row keys as an index
        (pd.Series([1, 2, 3]), [2, 3, 4]),
        (pd.Series([1.5, 2.0]), np.array([2.0])),
        (pd.Series([1, 2], dtype="int32"), [2**40, 2]),  # ints of two widths
        (pd.Series([1.0, 2.5]), [1, 2]),  # ints among floats
        (pd.Series(["1", "2"]).astype(str), [1, 2]),  # text never equals a number
        (pd.Series(["a", 1], dtype=object), ["a"]),  # mixed types: pandas' own comparison
        (pd.Series(["a", "b"]).astype(str), set()),
        (pd.Series([], dtype=object), ["a"]),
    ],
)
def test_among_answers_as_isin_does(values: pd.Series | pd.Index, candidates: object) -> None:
    expected = np.asarray(pd.Series(np.asarray(values, dtype=object)).isin(list(candidates)), dtype=bool)
    got = among(values, candidates)
    assert got.dtype == bool and got.shape == (len(values),)
    assert got.tolist() == expected.tolist()


def test_missing_values_are_never_among() -> None:
    values = pd.Series(["a", None, "b"], dtype=object).astype(str)
    assert among(values, ["a", "b"]).tolist() == [True, False, True]
    assert among(pd.Series(["a", None], dtype=object), ["a", None]).tolist() == [True, False]


def test_many_keys() -> None:
    keys = pd.Series([f"key-{i}" for i in range(50_000)]).astype(str)
    wanted = [f"key-{i}" for i in range(0, 50_000, 7)]
    got = among(keys, wanted)
    assert np.flatnonzero(got).tolist() == list(range(0, 50_000, 7))

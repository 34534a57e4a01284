"""Pseudonymized output columns: paths and carried ids masked with the key; unknown columns refused."""

from __future__ import annotations

import pandas as pd
import pytest

from cnn.batch.masking import Masking
from cnn.errors import UserError
from cnn.io.pseudonyms import pseudonym


def test_masking_replaces_the_named_columns_and_paths_with_pseudonyms() -> None:
    masking = Masking(("path", "claim_id"), b"key")
    frame = pd.DataFrame({"path": ["/a.jpg"], "claim_id": ["C-1"], "label": ["dent"]})
    masked = masking.apply(frame)
    assert masked["path"].tolist() == [pseudonym("/a.jpg", b"key")] and masked["label"].tolist() == ["dent"]
    assert masked["claim_id"].tolist() == [pseudonym("C-1", b"key")] and frame["claim_id"].tolist() == ["C-1"]
    assert masking.path("/a.jpg") == pseudonym("/a.jpg", b"key") and Masking().path("/a.jpg") == "/a.jpg"
    with pytest.raises(UserError, match="cannot pseudonymize policy_no"):
        Masking(("policy_no",), b"key").check(["claim_id"])
    with pytest.raises(UserError, match="needs a key"):
        Masking(("path",)).check([])

"""What a scoring run lists: folders, globs and manifests with carried id columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cnn.batch.plan import list_inputs
from cnn.errors import UserError
from tests.helpers import write_patterns


def test_list_inputs_folder_glob_and_manifest(tmp_path: Path) -> None:
    folder = write_patterns(tmp_path / "in", per_class=2)
    (folder / ".hidden.png").write_bytes(b"x")
    assert len(list_inputs(str(folder)).files) == 6
    assert len(list_inputs(str(folder / "*" / "checker*.png")).files) == 2
    pd.DataFrame({"path": ["checker/checker000.png"], "claim_id": ["C1"]}).to_csv(folder / "m.csv", index=False)
    listed = list_inputs(str(folder / "m.csv"))
    assert listed.id_columns == ["claim_id"] and listed.files["path"][0] == str(folder / "checker/checker000.png")
    pd.DataFrame({"path": ["a.png"], "label": ["x"]}).to_csv(folder / "bad.csv", index=False)
    with pytest.raises(UserError, match="has the name of a column the output has"):
        list_inputs(str(folder / "bad.csv"))
    with pytest.raises(UserError, match="nothing to score"):
        list_inputs(str(tmp_path / "missing"))

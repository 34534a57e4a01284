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


def test_planning_reads_no_more_of_a_file_than_the_decode_limit(tmp_path: Path) -> None:
    """A 1 GiB sparse file among the inputs: its id comes from the first max_file_bytes + 1 bytes, every night."""
    from cnn.io.inputs import content_ids

    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:
        handle.truncate(1 << 30)
    small = write_patterns(tmp_path / "in", per_class=1) / "checker" / "checker000.png"
    before = _bytes_read()
    ids = content_ids([str(huge), str(small)], max_file_bytes=1 << 20)
    assert _bytes_read() - before < 3 << 20
    assert len(set(ids)) == 2 and all(len(i) == 64 for i in ids)


def _bytes_read() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])

"""Walking a source is bounded: a link back to a visited folder is not followed again, links leaving the source
are not read unless allowed, the entries have a ceiling, and a stop request ends the walk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cnn import stopping
from cnn.batch.plan import list_inputs
from cnn.errors import UserError
from cnn.io.sources import scan_source
from cnn.io.walk import walk_files
from tests.helpers import write_patterns


@pytest.fixture
def looped(tmp_path: Path) -> Path:
    """A source whose subfolder links back to the source itself (`a -> ..`), plus one link out of it."""
    source = write_patterns(tmp_path / "src", per_class=2)
    os.symlink("..", source / "checker" / "a")
    (tmp_path / "secret.png").write_bytes((source / "checker" / "checker000.png").read_bytes())
    os.symlink(tmp_path / "secret.png", source / "checker" / "leak.png")
    return source


def test_a_glob_over_a_symlink_loop_lists_each_file_once(looped: Path) -> None:
    listed = list_inputs(str(looped / "**" / "*.png"))
    assert sorted(Path(p).name for p in listed.files["path"]) == sorted(p.name for p in looped.glob("*/*[0-9].png"))
    assert listed.outside == 1  # the link to ../secret.png is not read
    assert len(list_inputs(str(looped)).files) == 6


def test_links_leaving_a_source_are_read_only_when_allowed(looped: Path) -> None:
    assert not any("leak" in p for p in scan_source(looped).files["path"])
    assert scan_source(looped).skipped == 1
    assert any("leak" in p for p in scan_source(looped, allow_outside=True).files["path"])
    assert len(list_inputs(str(looped), allow_outside=True).files) == 7


def test_manifest_and_review_rows_outside_their_folder_are_refused_unless_allowed(looped: Path, tmp_path: Path) -> None:
    inside = str(looped / "checker" / "checker000.png")
    review = pd.DataFrame({"path": [inside, str(tmp_path / "secret.png")], "reviewed_label": ["checker"] * 2})
    review.to_csv(looped / "q.review.csv", index=False)
    with pytest.raises(
        UserError, match=r"1 row\(s\) of the review table name files outside its folder.*--allow-outside"
    ):
        scan_source(looped / "q.review.csv")
    assert len(scan_source(looped / "q.review.csv", allow_outside=True).files) == 2
    pd.DataFrame({"path": ["../secret.png"]}).to_csv(looped / "batch.csv", index=False)
    with pytest.raises(UserError, match="outside its folder"):
        list_inputs(str(looped / "batch.csv"))
    assert len(list_inputs(str(looped / "batch.csv"), allow_outside=True).files) == 1


def test_a_walk_past_its_ceiling_is_refused(looped: Path) -> None:
    with pytest.raises(UserError, match="more than 3 files and folders"):
        walk_files(looped, max_entries=3)


@pytest.fixture
def stop_requested() -> Iterator[None]:
    stopping.request_stop()
    yield
    stopping._requested.clear()


def test_a_stop_request_ends_a_listing_between_folders(looped: Path, stop_requested: None) -> None:
    with pytest.raises(SystemExit) as stopped:
        list_inputs(str(looped / "**" / "*.png"))
    assert stopped.value.code == stopping.TERMINATED

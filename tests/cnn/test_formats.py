"""Records carry their format: older ones are migrated a step at a time, newer ones refused with a message."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from cnn.errors import UserError
from cnn.formats import migrated
from cnn.model.contract import ModelContract
from cnn.model.run import FitResult


def test_migrations_run_in_order_from_the_records_format_and_a_newer_format_is_refused() -> None:
    steps = {1: lambda d: {**d, "b": d["a"] * 2}, 2: lambda d: {**d, "c": d["b"] + 1}}
    assert migrated({"a": 1}, 3, steps, "x.json") == {"a": 1, "b": 2, "c": 3, "format_version": 3}
    assert migrated({"a": 1, "b": 5, "format_version": 2}, 3, steps, "x.json")["c"] == 6  # only the steps it needs
    with pytest.raises(UserError, match=r"x.json was written by a newer version of cnn \(format 4"):
        migrated({"format_version": 4}, 3, steps, "x.json")


def test_fit_json_of_format_1_reads_as_typed_epochs(trained: FitResult, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    replace(trained, run_dir=run).save()
    data = json.loads((run / "fit.json").read_text())
    data.pop("format_version")
    data["history"] = [{**{k: v for k, v in h.items() if k != "val"}, **{f"val_{k}": v for k, v in h["val"].items()}}
                       for h in data["history"]]  # fmt: skip
    (run / "fit.json").write_text(json.dumps(data))
    assert FitResult.load(run).history == trained.history


def test_a_contract_from_a_newer_cnn_is_refused(trained: FitResult, tmp_path: Path) -> None:
    data = json.loads((trained.run_dir / "contract.json").read_text())
    (tmp_path / "contract.json").write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(UserError, match="newer version of cnn"):
        ModelContract.load(tmp_path / "contract.json")

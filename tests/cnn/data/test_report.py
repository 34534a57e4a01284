"""The dataset report: counts per class and split, rejects by reason, duplicates; saved and read back."""

from __future__ import annotations

import shutil
from pathlib import Path

from cnn.data.report import DatasetReport, IngestStats, build_report, save_report


def test_the_report_counts_what_the_manifest_holds_and_reads_back(patterns: Path, tmp_path: Path) -> None:
    folder = tmp_path / "patterns"
    shutil.copytree(patterns, folder)
    report = build_report(folder, IngestStats(layout="class-folders", files=120, decoded=120))
    assert report.ok == 120 and report.rejected == 0 and report.classes == ["checker", "horizontal", "vertical"]
    table = report.class_table()
    assert table.loc["total", "total"] == 120 and list(table.columns) == ["train", "val", "test", "total"]
    markdown = save_report(report, folder).read_text()
    assert "# Dataset report: patterns" in markdown and "120 decoded" in markdown
    assert DatasetReport.load(folder) == report

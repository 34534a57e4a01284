"""Ingest as a library: source layouts, manifests, incremental re-runs, the cache and the report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn.config import IngestOptions
from cnn.data.dataset import MANIFEST_COLUMNS, Dataset
from cnn.data.ingest import DecodeRecord, ingest, staged_stats
from cnn.data.report import build_report
from cnn.errors import UserError
from cnn.io.decode import DecodeSpec, decode_file
from cnn.io.sources import scan_source
from tests.helpers import image_bytes

OPTS = IngestOptions(image_size=16, channels=3, decode_workers=1)


def _ingest(source: Path, tmp_path: Path, options: IngestOptions = OPTS) -> tuple[Dataset, dict[str, object]]:
    root = tmp_path / "datasets" / "ds"
    ingest(source, root, options)
    return Dataset(root), staged_stats(root)


def test_class_folders_with_nested_and_hidden_files(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=6)
    (src / "cat" / "nested" / "deeper").mkdir(parents=True)
    (src / "cat" / "nested" / "deeper" / "x.png").write_bytes((src / "cat" / "cat000.png").read_bytes()[:-1] + b"!")
    (src / "cat" / ".hidden.png").write_bytes(b"junk")
    (src / ".cache").mkdir()
    (src / ".cache" / "y.png").write_bytes(b"junk")
    listing = scan_source(src)
    assert listing.layout == "class-folders"
    assert len(listing.files) == 13
    assert not listing.files["path"].str.contains(r"/\.").any()
    assert set(listing.files["label"]) == {"cat", "dog"}


def test_manifest_columns_and_split_distribution(write_images: Callable[..., Path], tmp_path: Path) -> None:
    dataset, stats = _ingest(write_images(per_class=20), tmp_path)
    manifest = dataset.manifest()
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert (manifest["status"] == "ok").all()
    assert manifest["image_id"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert set(manifest["format"]) == {"PNG"} and (manifest["width"] == 32).all()
    assert stats.decoded == 40 and stats.reused == 0


def test_cache_holds_the_decoded_pixels(write_images: Callable[..., Path], tmp_path: Path) -> None:
    dataset, _ = _ingest(write_images(per_class=5), tmp_path)
    cache = dataset.open_cache()
    assert len(cache.images.arrays) == 1 and isinstance(cache.images.arrays[0], np.memmap)
    assert cache.images.image_shape == (16, 16, 3)
    row = dataset.manifest().iloc[3]
    expected = decode_file(row["path"], DecodeSpec(channels=3, size=16)).array
    np.testing.assert_array_equal(cache.get(row["image_id"]), expected)


def test_split_folders_keep_given_splits_and_carve_val(write_images: Callable[..., Path], tmp_path: Path) -> None:
    write_images("tree/train", per_class=20)
    write_images("tree/test", per_class=5, seed=1)
    dataset, _ = _ingest(tmp_path / "tree", tmp_path)
    manifest = dataset.manifest()
    from_test = manifest["path"].str.contains("/tree/test/")
    assert (manifest.loc[from_test, "split"] == "test").all()
    assert set(manifest.loc[~from_test, "split"]) == {"train", "val"}
    assert dataset.meta().layout == "split-folders"


def test_csv_manifest_with_relative_paths_groups_and_splits(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=12)
    rows = []
    for i, path in enumerate(sorted(src.rglob("*.png"))):
        rows.append(
            {
                "path": str(path.relative_to(src)),
                "label": path.parent.name,
                "patient": f"P{i // 3}",
                "split": "test" if i == 0 else "",
            }
        )
    pd.DataFrame(rows).to_csv(src / "labels.csv", index=False)
    dataset, _ = _ingest(src / "labels.csv", tmp_path, OPTS.model_copy(update={"group_column": "patient"}))
    manifest = dataset.manifest()
    assert (manifest["status"] == "ok").all()
    assert manifest.groupby("group")["split"].nunique().max() == 1
    assert manifest.loc[manifest["group"] == "P0", "split"].eq("test").all()


def test_manifest_listing_a_file_twice_ingests_it_once(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=4)
    paths = sorted(str(p) for p in src.rglob("*.png"))
    pd.DataFrame({"path": paths + paths[:2], "label": ["a", "b"] * 4 + ["b", "b"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    dataset, stats = _ingest(tmp_path / "m.csv", tmp_path)
    manifest = dataset.manifest()
    assert len(manifest) == 8 and manifest["path"].is_unique
    assert manifest.set_index("path").loc[paths[0], "label"] == "a"  # the first row wins
    assert stats.skipped == 2


def test_parquet_manifest_and_missing_file_is_a_reject(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=5)
    paths = sorted(str(p) for p in src.rglob("*.png"))
    table = pd.DataFrame({"path": paths + [str(src / "gone.png")], "label": ["a"] * 5 + ["b"] * 6})
    table.to_parquet(tmp_path / "m.parquet")
    dataset, _ = _ingest(tmp_path / "m.parquet", tmp_path)
    manifest = dataset.manifest().set_index("path")
    assert manifest.loc[str(src / "gone.png"), "status"] == "rejected"
    assert manifest.loc[str(src / "gone.png"), "reason"] == "file not found"


@pytest.mark.parametrize(
    "content,message",
    [
        ("label\ncat\n", "lacks column"),
        ("path,label,split\na.png,cat,holdout\n", "not one of"),
        ("path,label\n,cat\n", "empty path"),
    ],
)
def test_manifest_errors(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        scan_source(tmp_path / "m.csv")


def test_source_errors(tmp_path: Path, write_images: Callable[..., Path]) -> None:
    with pytest.raises(UserError, match="source not found"):
        scan_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files found"):
        scan_source(tmp_path / "empty")
    one = write_images("one", classes=("cat",), per_class=3)
    with pytest.raises(UserError, match="at least two are needed"):
        _ingest(one, tmp_path)
    bad = tmp_path / "bad"
    for label in ("a", "b"):
        (bad / label).mkdir(parents=True)
        (bad / label / "x.jpg").write_text("<html></html>")
    with pytest.raises(UserError, match="holds no usable image"):
        _ingest(bad, tmp_path)


def test_incremental_rerun_decodes_only_new_and_changed(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=10)
    dataset, _ = _ingest(src, tmp_path)
    first = dataset.manifest().set_index("path")["split"]
    shards = dataset.meta().cache_shards

    dataset, stats = _ingest(src, tmp_path)
    assert stats.decoded == 0 and stats.reused == 20
    assert dataset.meta().cache_shards == shards and len(shards) == 1  # nothing changed: same cache file

    new = np.random.default_rng(9).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    (src / "dog" / "new.png").write_bytes(image_bytes(new))
    changed = src / "cat" / "cat001.png"
    changed.write_bytes(image_bytes(np.zeros((24, 32, 3), np.uint8)))
    os.utime(changed, ns=(1, 1))
    dataset, stats = _ingest(src, tmp_path)  # a Dataset object reads the generation it first saw
    assert stats.decoded == 2 and stats.reused == 19
    manifest = dataset.manifest().set_index("path")
    assert len(manifest) == 21
    unchanged = first.drop(str(changed))
    assert (manifest.loc[unchanged.index, "split"] == unchanged).all()  # old rows keep their splits
    cache = dataset.open_cache()
    assert len(cache) == 22  # the 21 images, and the changed file's old one: a dead slot until a compaction
    assert set(cache.index()) >= set(manifest["image_id"])
    np.testing.assert_array_equal(cache.get(manifest.loc[str(changed), "image_id"]), 0)
    assert dataset.meta().cache_shards[0] == shards[0] and len(dataset.meta().cache_shards) == 2  # appended
    assert len(list(dataset.cache_dir.iterdir())) == 4  # two shards, each an images and an ids file


def test_changed_image_size_rebuilds_cache(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=5)
    _ingest(src, tmp_path)
    dataset, stats = _ingest(src, tmp_path, OPTS.model_copy(update={"image_size": 24}))
    assert stats.decoded == 10
    assert dataset.open_cache().images.image_shape == (24, 24, 3)
    assert len(dataset.meta().cache_shards) == 1 and len(list(dataset.cache_dir.iterdir())) == 2  # old shard gone


def test_duplicates_and_conflicting_labels_reported(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=10)
    data = (src / "cat" / "cat000.png").read_bytes()
    (src / "cat" / "copy.png").write_bytes(data)
    (src / "dog" / "mislabelled.png").write_bytes(data)
    dataset, _ = _ingest(src, tmp_path)
    manifest = dataset.manifest()
    same = manifest[
        manifest["image_id"] == manifest.loc[manifest["path"].str.endswith("cat000.png"), "image_id"].iloc[0]
    ]
    assert len(same) == 3 and same["split"].nunique() == 1
    report = build_report(dataset.root)
    assert report.duplicate_sets == 1 and report.duplicate_files == 2
    assert report.conflicting_duplicates[0]["labels"] == ["cat", "dog"]
    assert len(dataset.open_cache()) == 20  # stored once
    assert "conflicting labels" in report.to_markdown()


def test_report_counts(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(per_class=10)
    (src / "cat" / "bad.jpg").write_bytes(b"")
    dataset, _ = _ingest(src, tmp_path)
    report = build_report(dataset.root)
    table = report.class_table()
    assert table.loc["total", "total"] == 20
    assert table.loc["cat", "total"] == 10
    assert report.rejects_by_reason == {"empty file (0 bytes)": 1}
    assert report.size_stats["width"]["median"] == 32


def test_class_names_that_cannot_be_column_names_are_refused(write_images: Callable[..., Path], tmp_path: Path) -> None:
    src = write_images(classes=('x"y', "dog"), per_class=3)
    with pytest.raises(UserError, match="class name\\(s\\) 'x\"y' cannot be used"):
        ingest(src, tmp_path / "datasets" / "bad", OPTS)
    ok = write_images(root="ok", classes=("Pneumonia (viral)", "normal"), per_class=3)
    ingest(ok, tmp_path / "datasets" / "ok", OPTS)


def test_a_second_ingest_of_the_same_dataset_is_refused_while_the_first_runs(
    write_images: Callable[..., Path], tmp_path: Path
) -> None:
    from cnn.data.ingest import ingest_lock

    root = tmp_path / "datasets" / "busy"
    with ingest_lock(root):  # as another process's ingest holds it
        with pytest.raises(UserError, match="'busy' is being ingested by another run"):
            ingest(write_images(per_class=3), root, OPTS)
    ingest(write_images(root="again", per_class=3), root, OPTS)  # free again once it finished
    assert Dataset(root).exists()


def test_an_ingest_that_dies_before_its_commit_point_leaves_the_previous_dataset(
    write_images: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifest, metadata and cache switch together: everything up to the pointer is written, then the process
    dies (the pointer's rename never happens). The dataset still reads as before, whole."""
    src = write_images(per_class=10)
    before, _ = _ingest(src, tmp_path)
    shards, rows = before.meta().cache_shards, len(before.manifest())
    (src / "dog" / "new.png").write_bytes(image_bytes(np.full((24, 32, 3), 7, np.uint8)))
    (src / "bird").mkdir()
    for i in range(3):
        (src / "bird" / f"b{i}.png").write_bytes(image_bytes(np.full((24, 32, 3), 9 + i, np.uint8)))

    def die_at_the_commit_point(self: Dataset, generation: str) -> None:
        raise KeyboardInterrupt  # not an Exception: nothing cleans up after it, as after kill -9

    monkeypatch.setattr(Dataset, "publish", die_at_the_commit_point)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, before.root, OPTS)
    after = Dataset(before.root)
    meta = after.meta()
    assert (meta.cache_shards, meta.classes, len(after.manifest())) == (shards, ["cat", "dog"], rows)
    assert len(after.open_cache()) == rows
    monkeypatch.undo()

    dataset, _ = _ingest(src, tmp_path)  # the next ingest commits and clears what the dead one left
    assert dataset.meta().classes == ["bird", "cat", "dog"] and len(dataset.manifest()) == rows + 4
    assert len(list((dataset.root / "generations").iterdir())) == 1
    assert (
        len(list(dataset.cache_dir.iterdir())) == 2 * len(dataset.meta().cache_shards) == 4
    )  # the dead run's shard went


def test_a_dataset_in_the_layout_before_generations_reads_and_moves_on_its_next_ingest(
    write_images: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    src = write_images(per_class=5)
    dataset, _ = _ingest(src, tmp_path)
    for name in ("manifest.parquet", "dataset.json"):  # as an earlier version left it
        shutil.move(dataset.manifest_path.parent / name, dataset.root / name)
    meta = json.loads((dataset.root / "dataset.json").read_text())
    meta["cache_token"] = meta.pop("cache_shards")[0]  # one cache file, before shards (dataset.json format 1)
    meta["format_version"] = 1
    (dataset.root / "dataset.json").write_text(json.dumps(meta))
    shutil.rmtree(dataset.root / "generations")
    (dataset.root / "CURRENT").unlink()
    legacy = Dataset(dataset.root)
    assert legacy.exists() and len(legacy.manifest()) == 10 and len(legacy.open_cache()) == 10
    moved, stats = _ingest(src, tmp_path)
    assert stats.reused == 10 and moved.manifest_path.parent.parent.name == "generations"
    assert not (moved.root / "manifest.parquet").exists() and not (moved.root / "dataset.json").exists()


def test_dicom_patient_id_groups_files_only_as_a_keyed_pseudonym(tmp_path: Path) -> None:
    from tests.helpers import write_dicom

    rng = np.random.default_rng(0)
    for label in ("normal", "effusion"):
        for patient in range(6):
            for scan in range(3):
                pixels = rng.integers(0, 256, (20, 20))
                write_dicom(
                    tmp_path / "src" / label / f"{label}-{patient}-{scan}.dcm", pixels, f"SECRET-{label}-{patient}"
                )
    root = tmp_path / "datasets" / "scans"
    ingest(tmp_path / "src", root, OPTS, pseudonym_key=b"k1")
    manifest = Dataset(root).manifest()
    assert manifest["group"].str.startswith("p-").all() and not manifest["group"].str.contains("SECRET").any()
    patients = manifest.assign(patient=manifest["path"].str.extract(r"/(\w+-\d)-\d\.dcm$")[0])
    assert (patients.groupby("patient")["group"].nunique() == 1).all()  # one pseudonym per patient
    assert (patients.groupby("patient")["split"].nunique() == 1).all()  # never across two splits
    assert patients["group"].nunique() == 12
    ingest(tmp_path / "src", tmp_path / "datasets" / "other-key", OPTS, pseudonym_key=b"k2")
    assert set(Dataset(tmp_path / "datasets" / "other-key").manifest()["group"]).isdisjoint(manifest["group"])
    ingest(tmp_path / "src", tmp_path / "datasets" / "no-key", OPTS)
    assert Dataset(tmp_path / "datasets" / "no-key").manifest()["group"].isna().all()


def test_a_filled_in_review_table_adds_reviewed_images(write_images: Callable[..., Path], tmp_path: Path) -> None:
    source = write_images(per_class=10)
    root = tmp_path / "ds"
    ingest(source, root, OPTS)
    before = Dataset(root).usable().set_index("path")
    incoming = write_images("incoming", per_class=3, seed=7)
    new = sorted(str(p) for p in incoming.rglob("*.png"))
    corrected = before.index[0]  # an image already in the dataset, whose label a reviewer corrects
    review = pd.DataFrame(
        {
            "image_id": ["x"] * (len(new) + 1),
            "path": [*new, corrected],
            "label": "cat",  # the model's label: ignored
            "reviewed_label": ["dog", "cat", "", None, "dog", "cat", "dog"],
            "model_name": "m",
        }
    )
    review.to_parquet(tmp_path / "preds.review.parquet")
    ingest(tmp_path / "preds.review.parquet", root, OPTS)  # a review table adds; it never replaces
    after = Dataset(root).usable().set_index("path")
    assert set(before.index) <= set(after.index)
    added = after.loc[[p for p in new if p in after.index]]
    assert len(added) == 4 and added["reviewed"].all()  # two blank rows were skipped
    assert added["label"].tolist() == ["dog", "cat", "dog", "cat"]
    assert after.loc[corrected, "label"] == "dog" and after.loc[corrected, "reviewed"]
    kept = before.index.drop(corrected)
    assert after.loc[kept, "split"].equals(before.loc[kept, "split"])  # earlier images keep their split
    assert not after.loc[kept, "reviewed"].any()
    assert staged_stats(root).decoded == 4  # only the added files are decoded


def test_add_keeps_the_dataset_and_replace_is_the_default(write_images: Callable[..., Path], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    ingest(write_images(per_class=6), root, OPTS)
    more = write_images("more", classes=("cat", "dog"), per_class=2, seed=5)
    ingest(more, root, OPTS.model_copy(update={"add": True}))
    assert len(Dataset(root).usable()) == 16
    ingest(more, root, OPTS)
    assert len(Dataset(root).usable()) == 4


def test_a_scheduled_re_ingest_of_the_source_keeps_reviewed_images(
    write_images: Callable[..., Path], tmp_path: Path
) -> None:
    source = write_images(per_class=6)
    root = tmp_path / "ds"
    ingest(source, root, OPTS)
    extra = write_images("reviewed", per_class=2, seed=9)
    corrected = sorted(str(p) for p in (source / "cat").glob("*.png"))[0]
    review = pd.DataFrame({"path": [*sorted(map(str, extra.rglob("*.png"))), corrected], "reviewed_label": "dog"})
    review.to_csv(tmp_path / "queue.review.csv", index=False)
    ingest(tmp_path / "queue.review.csv", root, OPTS)
    ingest(source, root, OPTS)  # the weekly pipeline ingests its raw source again (replace mode)
    after = Dataset(root).usable().set_index("path")
    assert len(after) == 12 + 4 and int(after["reviewed"].sum()) == 5
    assert after.loc[corrected, "label"] == "dog"  # the reviewer's label wins over the source folder's


def test_adding_one_percent_writes_about_one_percent_of_the_cache(tmp_path: Path) -> None:
    """The cache is append-only: a night that adds 1% new images writes one shard of about 1% of the bytes and
    leaves the earlier shard's file as it was (same inode, same bytes on disk)."""
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    for label in ("cat", "dog"):
        (src / label).mkdir(parents=True)
        for i in range(100):
            (src / label / f"{i:03d}.png").write_bytes(image_bytes(rng.integers(0, 256, (16, 16, 3), np.uint8)))
    dataset, _ = _ingest(src, tmp_path)
    (first,) = dataset.meta().cache_shards
    first_file = dataset.cache_paths(first)[0]
    before = (first_file.stat().st_ino, first_file.stat().st_mtime_ns, first_file.read_bytes())
    for i in range(2):  # 1% of 200
        (src / "dog" / f"new{i}.png").write_bytes(image_bytes(rng.integers(0, 256, (16, 16, 3), np.uint8)))

    dataset, stats = _ingest(src, tmp_path)
    old, new = dataset.meta().cache_shards
    assert old == first and stats.decoded == 2 and stats.reused == 200
    assert (first_file.stat().st_ino, first_file.stat().st_mtime_ns, first_file.read_bytes()) == before
    new_file = dataset.cache_paths(new)[0]
    assert new_file.stat().st_size < 0.02 * first_file.stat().st_size  # about 1% (plus the .npy header)
    manifest = dataset.usable()
    assert len(dataset.open_cache()) == 202 and set(dataset.open_cache().index()) == set(manifest["image_id"])


def test_the_cache_compacts_when_dead_images_outnumber_live_ones(
    write_images: Callable[..., Path], tmp_path: Path
) -> None:
    src = write_images(per_class=10)
    dataset, _ = _ingest(src, tmp_path)
    for path in sorted(src.glob("*/*.png"))[:14]:  # 14 of 20 files leave the source: 14 dead slots, 6 live
        path.unlink()
    (src / "cat" / "late.png").write_bytes(image_bytes(np.full((24, 32, 3), 5, np.uint8)))
    dataset, stats = _ingest(src, tmp_path)
    assert stats.decoded == 1 and len(dataset.meta().cache_shards) == 1  # one compacted shard, not two
    assert DecodeRecord.load(dataset.root).compacted
    cache = dataset.open_cache()
    assert len(cache.ids) == len(cache) == 7 and len(list(dataset.cache_dir.iterdir())) == 2
    for row in dataset.usable().itertuples():
        np.testing.assert_array_equal(cache.get(row.image_id), decode_file(row.path, OPTS.decode_spec()).array)


def test_training_reads_across_shards_what_a_single_shard_holds(
    write_images: Callable[..., Path], tmp_path: Path
) -> None:
    from cnn.data.loaders import CacheDataset, load_split

    src = write_images(per_class=10)
    _ingest(src, tmp_path)
    for i in range(6):
        (src / ("cat" if i % 2 else "dog") / f"extra{i}.png").write_bytes(
            image_bytes(np.full((24, 32, 3), 40 * i, np.uint8))
        )
    dataset, _ = _ingest(src, tmp_path)
    assert len(dataset.meta().cache_shards) == 2
    classes = dataset.meta().classes
    split = load_split(dataset, "train", classes)
    assert len(split.shard_files) == 2 and split.slots.max() >= 20  # rows from both shards
    images = split.read_images()
    for image, path in zip(images, split.paths):
        np.testing.assert_array_equal(image, decode_file(path, OPTS.decode_spec()).array)
    order = np.random.default_rng(0).permutation(len(split.slots)).tolist()
    batch, labels = CacheDataset(split).__getitems__(order)
    np.testing.assert_array_equal(batch.numpy(), images[order])
    np.testing.assert_array_equal(labels.numpy(), split.labels[order])

"""Sources in an object store, against a real S3-compatible server (SeaweedFS on loopback): streamed listing,
ingest from a bucket the same as from disk, object versions in increments, manifests beside the images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cnn.config import IngestOptions
from cnn.data.dataset import Dataset
from cnn.data.ingest import ingest, staged_stats
from cnn.errors import UserError
from cnn.io import storage
from cnn.io.sources import scan_source
from tests.helpers import image_bytes
from tests.s3 import S3Server

OPTS = IngestOptions(image_size=16, channels=3, decode_workers=1)


def upload(local: Path, url: str) -> None:
    """Copy a folder tree to `url` (one object per file, same relative keys)."""
    fs, path = storage.filesystem(url)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{path}/{file.relative_to(local).as_posix()}", file.read_bytes())


def test_listing_is_streamed_page_by_page(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    url = s3.bucket("many")
    fs, path = storage.filesystem(url)
    fs.pipe({f"{path}/p/{i:05d}.png": b"x" for i in range(1050)})  # past one page of the server (1000 keys)
    calls: list[dict[str, Any]] = []
    original = type(fs)._call_s3

    async def counted(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "list_objects_v2":
            calls.append(kwargs)
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(type(fs), "_call_s3", counted)
    listing = storage.iter_objects(f"{url}/p")
    first = next(listing)
    assert first.url == f"{url}/p/00000.png" and first.size == 1 and first.version
    assert len(calls) == 1  # the first object came from the first page, before the rest was listed
    rest = list(listing)
    assert len(rest) == 1049 and len(calls) == 2
    assert "ContinuationToken" in calls[1]


def test_ingest_from_a_bucket_matches_the_same_files_on_disk(
    s3: S3Server, write_images: Callable[..., Path], tmp_path: Path
) -> None:
    local = write_images(per_class=8)
    url = s3.bucket("photos")
    upload(local, f"{url}/claims")
    ingest(local, tmp_path / "a" / "ds", OPTS)
    ingest(f"{url}/claims/", tmp_path / "b" / "ds", OPTS)
    from_disk, from_bucket = Dataset(tmp_path / "a" / "ds"), Dataset(tmp_path / "b" / "ds")
    disk, bucket = from_disk.manifest(), from_bucket.manifest()
    assert bucket["path"].str.startswith(f"{url}/claims/").all()
    assert (bucket["version"].str.len() > 0).all() and (disk["version"] == "").all()
    columns = ["image_id", "label", "split", "width", "height", "status"]
    left = disk.assign(key=disk["path"].str.split("/src/").str[1]).sort_values("key")
    right = bucket.assign(key=bucket["path"].str.split("/claims/").str[1]).sort_values("key")
    pd.testing.assert_frame_equal(
        left[["key", *columns]].reset_index(drop=True), right[["key", *columns]].reset_index(drop=True)
    )
    a, b = from_disk.open_cache(), from_bucket.open_cache()
    for image_id in disk["image_id"]:
        np.testing.assert_array_equal(a.get(image_id), b.get(image_id))


def test_a_night_with_new_and_replaced_objects_decodes_only_those(
    s3: S3Server, write_images: Callable[..., Path], tmp_path: Path
) -> None:
    url = s3.bucket("nightly")
    upload(write_images(per_class=6), url)
    root = tmp_path / "ds"
    ingest(url, root, OPTS)
    first = Dataset(root).manifest().set_index("path")
    fs, path = storage.filesystem(url)
    pixels = np.random.default_rng(7).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    fs.pipe_file(f"{path}/cat/cat000.png", image_bytes(pixels))  # replaced: same key, new bytes
    fs.pipe_file(f"{path}/dog/new.png", image_bytes(255 - pixels))  # new
    ingest(url, root, OPTS)
    stats, second = staged_stats(root), Dataset(root).manifest().set_index("path")
    assert stats.decoded == 2 and stats.reused == 11
    replaced = f"{url}/cat/cat000.png"
    assert second.loc[replaced, "version"] != first.loc[replaced, "version"]
    assert second.loc[replaced, "image_id"] != first.loc[replaced, "image_id"]
    assert f"{url}/dog/new.png" in second.index and len(second) == 13


def test_a_manifest_in_the_bucket_names_keys_beside_it(s3: S3Server, write_images: Callable[..., Path]) -> None:
    local = write_images(per_class=3)
    url = s3.bucket("listed")
    upload(local, f"{url}/images")
    rows = [f"images/{p.parent.name}/{p.name},{p.parent.name},test" for p in sorted(local.rglob("*.png"))]
    rows.append("images/cat/missing.png,cat,")
    storage.write_object(f"{url}/manifest.csv", ("path,label,split\n" + "\n".join(rows) + "\n").encode())
    listing = scan_source(f"{url}/manifest.csv")
    assert listing.layout == "manifest" and len(listing.files) == 7
    files = listing.files.set_index("path")
    assert files.loc[f"{url}/images/cat/cat000.png", "size_bytes"] > 0
    assert files.loc[f"{url}/images/cat/cat000.png", "version"]
    assert files.loc[f"{url}/images/cat/missing.png", "size_bytes"] == -1  # the decoder reports it as a reject
    assert set(listing.files["split"].dropna()) == {"test"}


def test_split_folders_in_a_bucket(s3: S3Server, write_images: Callable[..., Path]) -> None:
    url = s3.bucket("splits")
    upload(write_images("train", per_class=2), f"{url}/data/train")
    upload(write_images("test", per_class=1), f"{url}/data/test")
    storage.write_object(f"{url}/data/README.txt", b"loose")
    listing = scan_source(f"{url}/data")
    assert listing.layout == "split-folders" and listing.skipped == 1
    assert sorted(listing.files["split"].value_counts().items()) == [("test", 2), ("train", 4)]


def test_unusable_object_sources_say_what_is_wrong(s3: S3Server) -> None:
    url = s3.bucket("empty")
    with pytest.raises(UserError, match="no objects found"):
        scan_source(f"{url}/nothing-here")
    with pytest.raises(UserError, match="cannot list"):
        scan_source("s3://no-such-bucket-for-this-test/x")
    with pytest.raises(UserError, match="credentials"):
        storage.filesystem("s3://key:secret@bucket/x")
    with pytest.raises(UserError, match="unsupported URL scheme"):
        storage.filesystem("ftp://host/x")


def test_file_urls_are_local_paths(write_images: Callable[..., Path]) -> None:
    local = write_images(per_class=2)
    listing = scan_source(f"file://{local}")
    assert listing.layout == "class-folders" and len(listing.files) == 4
    assert listing.files["path"].str.startswith(str(local)).all()


def test_a_task_fetches_its_objects_together_and_a_missing_one_is_its_own_reject(s3: S3Server) -> None:
    from cnn.io import decode
    from cnn.io.decode import DecodeError, DecodeSpec, RejectKind, read_image_bytes

    url = s3.bucket("prefetch")
    storage.write_object(f"{url}/a.png", b"a" * 10)
    storage.write_object(f"{url}/b.png", b"b" * 5000)
    spec = DecodeSpec(channels=1, size=8, max_file_bytes=100)
    paths = [f"{url}/a.png", f"{url}/b.png", f"{url}/gone.png"]
    with decode.prefetched(paths, spec):
        assert set(decode._PREFETCHED) == set(paths)  # fetched before the first read
        s3.admin().rm_file(f"{url}/a.png"[len("s3://") :])  # the task reads what it fetched
        assert read_image_bytes(paths[0], spec) == b"a" * 10
        with pytest.raises(DecodeError) as large:
            read_image_bytes(paths[1], spec)
        with pytest.raises(DecodeError) as gone:
            read_image_bytes(paths[2], spec)
    assert large.value.kind == RejectKind.TOO_LARGE and gone.value.kind == RejectKind.NOT_FOUND
    assert decode._PREFETCHED == {}


def test_an_object_glob_is_matched_on_a_bounded_streamed_listing(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """`s3://bucket/in/**/*.png` lists the same objects a local glob would list from the same tree (hidden keys
    left out), and a prefix holding more objects than a source may is refused, not listed for hours."""
    from cnn.batch.plan import list_inputs
    from cnn.io import sources

    url = s3.bucket("globbed")
    fs, path = storage.filesystem(url)
    keys = ["in/a.png", "in/x/b.png", "in/x/y/c.png", "in/x/c.jpg", "in/.hidden/d.png", "other/e.png"]
    fs.pipe({f"{path}/{key}": b"x" for key in keys})
    listed = list_inputs(f"{url}/in/**/*.png").files["path"].tolist()
    assert listed == [f"{url}/{k}" for k in ("in/a.png", "in/x/b.png", "in/x/y/c.png")]
    assert list_inputs(f"{url}/in/*/*.png").files["path"].tolist() == [f"{url}/in/x/b.png"]
    monkeypatch.setattr(sources, "MAX_SOURCE_ENTRIES", 2)
    with pytest.raises(UserError, match="holds more than 2 objects"):
        list_inputs(f"{url}/in/**/*.png")

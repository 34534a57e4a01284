"""The pipeline on object storage, with the installed `cnn` against a real S3-compatible server: ingest from a
bucket, train, score a bucket prefix into Delta tables in another bucket, then a night with new and replaced objects;
the store's secret key never shows in what the run leaves behind."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn.batch.delta_sink import DeltaSink, read_tables
from cnn.io import storage
from tests.helpers import clean_env, tiny_config, write_patterns
from tests.s3 import S3Server

CNN = str(Path(sys.executable).with_name("cnn"))
pytestmark = [pytest.mark.slow, pytest.mark.slowest]  # minutes: in make test-all and CI


def _upload(local: Path, url: str) -> None:
    fs, path = storage.filesystem(url)
    fs.pipe({f"{path}/{f.relative_to(local).as_posix()}": f.read_bytes() for f in local.rglob("*") if f.is_file()})


def test_ingest_train_and_score_with_buckets_then_an_incremental_night(
    s3: S3Server, prefect_server: None, tmp_path: Path
) -> None:
    from prefect.settings import get_current_settings

    home = tmp_path / "home"
    env = clean_env(home, PREFECT_API_URL=str(get_current_settings().api.url), **s3.env())

    def cnn(*args: str) -> str:
        done = subprocess.run([CNN, *args], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    training, incoming, results = s3.bucket("training"), s3.bucket("incoming"), s3.bucket("results")
    _upload(write_patterns(tmp_path / "train", per_class=30, seed=0), f"{training}/patterns")
    _upload(write_patterns(tmp_path / "night1", per_class=4, seed=5), f"{incoming}/2026-11-30")
    tiny_config(tmp_path / "fast.yaml", epochs=3)
    output = cnn("ingest", f"{training}/patterns", "--dataset", "patterns", "--image-size", "24", "--channels", "1")
    output += cnn("train", "--dataset", "patterns", "--config", str(tmp_path / "fast.yaml"))
    out = f"{results}/scores"
    score = ["score", f"{incoming}/", "--model", "patterns", "--output", out, "--shard-size", "5"]
    score += ["--review-below", "0.99"]  # rows for the review queue, each with its overlay
    first = cnn(*score)
    assert "12 predictions, 0 rejects" in first, first[-2000:]
    sink = DeltaSink(out)
    table = read_tables(sink, current=True)["predictions"]
    assert len(table) == 12 and table["path"].is_unique and table["path"].str.startswith(f"{incoming}/").all()
    assert (table["source_version"].str.len() > 0).all()
    commits = sink.table("predictions").version()  # type: ignore[union-attr]
    assert commits == 2  # one commit per shard of 5: 12 images, 3 shards, versions 0-2
    overlays = table["explanation"].dropna()
    assert len(overlays) > 0 and overlays.str.startswith("explanations/").all()  # relative, in the bucket
    assert all(storage.read_object(f"{out}/{e}")[:2] == b"\xff\xd8" for e in overlays)  # JPEGs

    again = cnn(*score)
    assert "0 predictions, 0 rejects, 12 already scored" in again, again[-2000:]
    assert sink.table("predictions").version() == commits  # type: ignore[union-attr]  # nothing written

    # the next night: two new objects and one replaced by other bytes under the same key
    fs, _ = storage.filesystem(incoming)
    replaced = sorted(table["path"])[0]
    pixels = np.full((32, 32), 255, dtype=np.uint8)
    pixels[::4] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    fs.pipe_file(replaced[len("s3://") :], buffer.getvalue())
    _upload(write_patterns(tmp_path / "night2", per_class=1, seed=9), f"{incoming}/2026-12-01")
    night = cnn(*score)
    assert "4 predictions, 0 rejects, 11 already scored" in night, night[-2000:]
    table = read_tables(sink, current=True)["predictions"]
    live = table[table["superseded_at"].isna()]
    assert len(live) == 15 and live["path"].is_unique
    old = table[table["path"] == replaced]
    assert len(old) == 2 and old["source_version"].nunique() == 2 and old["image_id"].nunique() == 2

    explained = cnn("explain", replaced, "--model", "patterns", "--out", str(tmp_path / "why"))  # an object by URL
    assert len(list((tmp_path / "why").glob("*.json"))) == 1, explained[-2000:]

    logs = output + first + again + night + explained
    secret = s3.secret_key.encode()
    leaked = [str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert s3.secret_key not in logs and not leaked, leaked
    for url in storage.list_prefix(results):
        assert s3.secret_key.encode() not in storage.read_object(url), url

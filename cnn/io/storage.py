"""Objects in storage by URL (`s3://`, `gs://`, `az://`, `file://`) through fsspec: list, read and write them.

Credentials come from each cloud's usual places (environment variables, `~/.aws`, `gcloud` application default
credentials, `AZURE_STORAGE_*`), read by the cloud's own library; nothing here ever sees or writes them. An
S3-compatible store on premises is named by `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), as the AWS tools do.

A `file://` URL is a local path: callers turn it into one with `local_path` and take the local code paths. The
object functions (read, write, info, list, remove) take plain local paths too, so that a table can be kept the
same way on disk (a write there is atomic: a temporary file, then a rename).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cnn.errors import UserError
from cnn.fsio import atomic_path
from cnn.io import credentials as url_credentials
from cnn.waits import Waits

# scheme -> the fsspec implementation's package; package -> the pip extra that installs it
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
BACKENDS["abfss"] = "adlfs"
EXTRA = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
PAGE = 1000  # objects per listing page (S3's own maximum)
READ_THREADS = 16  # object reads wait on the network, not the CPU
SPOOL_BYTES = 2 << 30  # what a scoring run keeps of the objects it hashed, for its decoder (see fetch_objects)


_CLIENT_ENV = ("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_", "AZURE_", "FSSPEC_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def client_environment() -> dict[str, str]:
    """The environment variables object store clients read (endpoints, regions, profiles, credentials), for worker
    processes started from an older snapshot of it (a forkserver). They travel in memory only."""
    return {k: v for k, v in os.environ.items() if k.upper().startswith(_CLIENT_ENV)}


def scheme(text: str) -> str:
    """The URL scheme of `text` in lower case ("" for a plain path)."""
    found = _SCHEME.match(str(text))
    return found.group(1).lower() if found else ""


def is_url(text: object) -> bool:
    """Whether `text` names an object in a store this module reads (not a plain path, not a `file://` URL)."""
    return scheme(str(text)) in BACKENDS


def local_path(text: str) -> str:
    """A `file://` URL as a plain path; anything else unchanged."""
    if scheme(text) != "file":
        return text
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise UserError(f"file URL {text!r} names host {parts.netloc!r}: use file:///absolute/path")
    return unquote(parts.path)


def redact(url: str) -> str:
    """A URL without its user info and with every credential in its query masked (never shown with them)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    return url_credentials.redact(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())


def refuse_credentials(url: str) -> None:
    """Object store URLs never carry credentials (user info, or a token, key or signature in the query): they would
    reach flow parameters, logs and tables. Raise a UserError saying where credentials belong."""
    if is_url(url) and ("@" in urlsplit(url).netloc or url_credentials.carries_credentials(url)):
        raise UserError(
            f"{redact(url)}: put credentials in the environment, ~/.aws or the store's own config, never in the URL"
        )


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it; a UserError names the extra to install."""
    name = scheme(url)
    package = BACKENDS.get(name)
    if package is None:
        raise UserError(f"{redact(url)}: unsupported URL scheme {name!r} (use s3://, gs://, az:// or file://)")
    refuse_credentials(url)
    # imported here: object stores only: fsspec and the store's client load on the first URL
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **_client_waits(name))
    except ImportError:
        raise UserError(
            f"reading {name}:// URLs needs {package}: pip install '.[{EXTRA[package]}]' (or pip install {package})"
        ) from None
    return fs, path


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its URL, size, version (the store's version id or ETag: it changes whenever the bytes do) and
    modification time."""

    url: str
    size: int
    version: str
    mtime_ns: int


def object_version(info: dict[str, Any]) -> str:
    """The store's identity of an object's current bytes: a version id where the bucket keeps versions, else the
    ETag (S3, Azure) or generation (GCS)."""
    for key in ("VersionId", "version_id", "generation", "ETag", "etag"):
        value = info.get(key)
        if value not in (None, "", "null"):
            return str(value).strip('"')
    return ""


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("LastModified", "last_modified", "updated", "mtime"):
        value = info.get(key)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, int | float):
            return int(value * 1e9)
        if isinstance(value, str) and value:
            try:
                return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return -1


def _info(protocol: str, info: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(f"{protocol}://{info['name']}", int(info.get("size") or 0), object_version(info), _mtime_ns(info))


def iter_objects(url: str) -> Iterator[ObjectInfo]:
    """Every object below the prefix `url` (a folder: with or without the trailing /), streamed page by page: a
    prefix of a million objects is never one listing in memory. Order: as the store lists them."""
    fs, path = filesystem(url)
    protocol = scheme(url)
    try:
        if hasattr(fs, "_iterdir") and hasattr(fs, "split_path"):  # s3fs: one paginated flat listing
            yield from (_info(protocol, i) for i in _s3_pages(fs, path))
            return
        for _, _, files in fs.walk(path, detail=True):  # other stores: a folder's listing at a time
            for info in files.values():
                if info.get("type") != "directory":
                    yield _info(protocol, info)
    except (FileNotFoundError, PermissionError) as exc:
        raise UserError(f"cannot list {redact(url)}: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot list {redact(url)}: {exc}") from None


def _s3_pages(fs: Any, path: str) -> Iterator[dict[str, Any]]:
    # imported here: object stores only: fsspec and the store's client load on the first URL
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    prefix = f"{key.rstrip('/')}/" if key else ""
    pages = fs._iterdir(bucket, delimiter="", prefix=prefix)

    async def page() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while len(items) < PAGE:
            try:
                items.append(await pages.__anext__())
            except StopAsyncIteration:
                break
        return items

    while items := sync(fs.loop, page):
        yield from (i for i in items if i.get("type") == "file")


def info(url: str) -> ObjectInfo:
    """One object's (or local file's) size and version; FileNotFoundError where there is none."""
    if not is_url(url):
        found = os.stat(url)
        return ObjectInfo(url, found.st_size, f"{found.st_mtime_ns}-{found.st_size}", found.st_mtime_ns)
    fs, path = filesystem(url)
    return _info(scheme(url), fs.info(path))


def read_object(url: str, max_bytes: int | None = None) -> bytes:
    """An object's bytes; at most `max_bytes + 1` are fetched, so a caller can tell an oversize object."""
    if not is_url(url):
        with open(url, "rb") as handle:
            return handle.read(-1 if max_bytes is None else max_bytes + 1)
    fs, path = filesystem(url)
    if max_bytes is None:
        return bytes(fs.cat_file(path))
    try:
        return bytes(fs.cat_file(path, start=0, end=max_bytes + 1))
    except Exception:  # a ranged read of an empty object is refused by some stores (416): it has no bytes to give
        if fs.info(path).get("size") == 0:
            return b""
        raise


def write_object(url: str, data: bytes) -> None:
    """Write a whole object in one request (a local file: atomically): readers see the old object or the new one,
    never a part."""
    if not is_url(url):
        with atomic_path(url) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def list_prefix(url: str) -> list[str]:
    """The URLs (or paths) of the objects (files) below `url`, sorted (for small listings: a table's parts); a
    local listing leaves out the temporary files of writes in progress."""
    if not is_url(url):
        found = [os.path.join(d, f) for d, _, files in os.walk(url) for f in files if not f.startswith(".")]
        return sorted(found)
    return sorted(o.url for o in iter_objects(url))


def sha256_objects(urls: list[str], threads: int = READ_THREADS, max_bytes: int | None = None) -> list[str]:
    """The sha256 of each object's bytes, or of its first `max_bytes + 1` ("" where it cannot be read), reading
    several at a time."""
    return [digest for digest, _ in fetch_objects(urls, None, threads=threads, max_bytes=max_bytes)]


def fetch_objects(
    urls: list[str],
    folder: Path | None,
    budget: int = SPOOL_BYTES,
    threads: int = READ_THREADS,
    max_bytes: int | None = None,
) -> list[tuple[str, str]]:
    """(sha256, local copy) of each object, reading several at a time ("", "" where one cannot be read); with
    `max_bytes`, at most `max_bytes + 1` bytes of each are fetched (an oversize object is hashed on those and never
    kept). With a `folder`, the bytes are kept there as `<sha256>` files, up to `budget` bytes in all (beyond it: no
    copy), so that what reads them next (the decoder) reads a local file instead of fetching the object again."""
    kept, lock = [0], threading.Lock()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def fetch(url: str) -> tuple[str, str]:
        try:
            data = read_object(url, max_bytes)
        except Exception:  # noqa: BLE001 - each store's client raises its own types: the decoder says why
            return "", ""
        digest = hashlib.sha256(data).hexdigest()
        if folder is None or (max_bytes is not None and len(data) > max_bytes):
            return digest, ""
        with lock:
            if kept[0] + len(data) > budget:
                return digest, ""
            kept[0] += len(data)
        copy = folder / digest
        if not copy.exists():
            write_object(str(copy), data)
        return digest, str(copy)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fetch, urls))


def join(url: str, *names: str) -> str:
    """`url` (or a local path) with `names` appended as path parts."""
    return "/".join([url.rstrip("/"), *(n.strip("/") for n in names)])


def parent(url: str) -> str:
    """The folder part of an object URL (`s3://b/a/m.csv` -> `s3://b/a`)."""
    head, _, _ = url.rstrip("/").rpartition("/")
    return head if scheme(head) and head.count("/") >= 2 and not head.endswith(":/") else url


def delta_options(url: str) -> dict[str, str]:
    """What delta-rs needs beyond what it reads from the environment itself (the same AWS_*, GOOGLE_*, AZURE_*
    variables as fsspec): the bounded waits (cnn.waits) of its object store client, and plain HTTP allowed where an
    on-premises S3 endpoint is named by an http:// URL."""
    if not is_url(url):
        return {}
    waits = Waits.from_environment()
    options = {
        "timeout": f"{waits.timeout_s:g}s",
        "connect_timeout": f"{waits.timeout_s:g}s",
        "max_retries": str(waits.retries),
        "retry_timeout": f"{waits.longest_s():g}s",
    }
    if scheme(url) in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    return options


def _client_waits(name: str) -> dict[str, Any]:
    """The bounded waits (cnn.waits) for an S3 client (botocore's timeouts and standard retries with backoff); the
    other stores' clients keep their own."""
    if name not in ("s3", "s3a"):
        return {}
    waits = Waits.from_environment()
    timeouts = {"connect_timeout": waits.timeout_s, "read_timeout": waits.timeout_s}
    return {"config_kwargs": {**timeouts, "retries": {"max_attempts": waits.retries + 1, "mode": "standard"}}}

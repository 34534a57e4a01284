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
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cnn.errors import UserError
from cnn.fsio import atomic_path

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
    """A URL without any user or password part (never written anywhere with them)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it; a UserError names the extra to install."""
    name = scheme(url)
    package = BACKENDS.get(name)
    if package is None:
        raise UserError(f"{redact(url)}: unsupported URL scheme {name!r} (use s3://, gs://, az:// or file://)")
    if "@" in urlsplit(url).netloc and name.startswith("s3"):
        raise UserError(f"{redact(url)}: put credentials in the environment or ~/.aws, never in the URL")
    # imported here: object stores only: fsspec and the store's client load on the first URL
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
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
    return bytes(fs.cat_file(path, start=0, end=max_bytes + 1))


def write_object(url: str, data: bytes) -> None:
    """Write a whole object in one request (a local file: atomically): readers see the old object or the new one,
    never a part."""
    if not is_url(url):
        with atomic_path(url) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def remove(urls: Iterable[str]) -> None:
    """Delete objects (missing ones are fine)."""
    for url in urls:
        try:
            if not is_url(url):
                os.unlink(url)
                continue
            fs, path = filesystem(url)
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def list_prefix(url: str) -> list[str]:
    """The URLs (or paths) of the objects (files) below `url`, sorted (for small listings: a table's parts); a
    local listing leaves out the temporary files of writes in progress."""
    if not is_url(url):
        found = [os.path.join(d, f) for d, _, files in os.walk(url) for f in files if not f.startswith(".")]
        return sorted(found)
    return sorted(o.url for o in iter_objects(url))


def glob(pattern: str) -> list[str]:
    """Objects matching a glob URL (`s3://bucket/photos/**/*.jpg`), sorted."""
    fs, path = filesystem(pattern)
    protocol = scheme(pattern)
    try:
        found = fs.glob(path, detail=True)
    except OSError as exc:
        raise UserError(f"cannot list {redact(pattern)}: {exc}") from None
    return sorted(f"{protocol}://{name}" for name, i in found.items() if i.get("type") != "directory")


def sha256_objects(urls: list[str], threads: int = READ_THREADS) -> list[str]:
    """The sha256 of each object's bytes ("" where it cannot be read), reading several at a time."""
    return [digest for digest, _ in fetch_objects(urls, None, threads=threads)]


def fetch_objects(
    urls: list[str], folder: Path | None, budget: int = SPOOL_BYTES, threads: int = READ_THREADS
) -> list[tuple[str, str]]:
    """(sha256, local copy) of each object, reading several at a time ("", "" where one cannot be read). With a
    `folder`, the bytes are kept there as `<sha256>` files, up to `budget` bytes in all (beyond it: no copy), so
    that what reads them next (the decoder) reads a local file instead of fetching the object a second time."""
    kept, lock = [0], threading.Lock()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def fetch(url: str) -> tuple[str, str]:
        try:
            data = read_object(url)
        except Exception:  # noqa: BLE001 - each store's client raises its own types: the decoder says why
            return "", ""
        digest = hashlib.sha256(data).hexdigest()
        if folder is None:
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


# --- a lock in the store --------------------------------------------------------------------------------------

LOCK_LEASE_S = 60.0  # a lock whose holder has not renewed it for this long is taken over (a killed holder)
LOCK_WAIT_S = 900.0  # how long to wait for a lock before giving up (a busy publish, not a dead one)


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than LOCK_WAIT_S, renewing it all along."""


def create_exclusive(url: str, data: bytes) -> str:
    """Create an object only if there is none (S3's conditional PUT, `If-None-Match: *`; O_EXCL on disk): its
    version, or "" when one exists already."""
    if not is_url(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(url, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return ""
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return info(url).version
    return _conditional_put(url, data, IfNoneMatch="*")


def replace_if(url: str, data: bytes, version: str) -> str:
    """Replace an object only if it still has `version` (S3's `If-Match`): its new version, or "" when it changed."""
    if not is_url(url):
        try:
            if info(url).version != version:
                return ""
        except FileNotFoundError:
            return ""
        write_object(url, data)
        return info(url).version
    return _conditional_put(url, data, IfMatch=f'"{version}"')


def _conditional_put(url: str, data: bytes, **condition: str) -> str:
    fs, path = filesystem(url)
    if not hasattr(fs, "call_s3"):  # stores without conditional writes here (gs://, az://): no exclusion
        fs.pipe_file(path, data)
        return info(url).version
    bucket, key, _ = fs.split_path(path)
    try:
        answer = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as exc:
        if "condition" in str(exc).lower():  # 412 Precondition Failed (or 409 for a concurrent conditional write)
            return ""
        raise
    fs.invalidate_cache(path)
    return str(answer.get("ETag", "")).strip('"')


@contextmanager
def exclusive(url: str, lease_s: float | None = None, wait_s: float | None = None) -> Iterator[None]:
    """Hold the lock object `url` for the block: one holder at a time across processes and machines. The holder
    renews it every quarter lease; a lock nobody renewed for a whole lease (its holder was killed) is taken over.
    Needs conditional writes (S3 and S3-compatible stores, local disk); elsewhere it does not exclude."""
    lease = LOCK_LEASE_S if lease_s is None else lease_s
    deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
    owner = uuid.uuid4().hex
    seen, since = "", time.monotonic()
    while not (version := create_exclusive(url, f"{owner} 0".encode())):
        try:
            current = info(url).version
        except FileNotFoundError:
            continue  # released meanwhile
        if current != seen:
            seen, since = current, time.monotonic()
        elif time.monotonic() - since > lease:  # not renewed for a lease: its holder is gone
            if _unchanged(url, seen):
                remove([url])
            continue
        if time.monotonic() > deadline:
            raise LockTimeout(f"{redact(url)} stayed locked by another process for {LOCK_WAIT_S:.0f} s")
        time.sleep(min(0.5, lease / 8))
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(url, owner, version, lease, stop), daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        remove([url])


def _unchanged(url: str, version: str) -> bool:
    try:
        return info(url).version == version
    except FileNotFoundError:
        return False


def _renew(url: str, owner: str, version: str, lease: float, stop: threading.Event) -> None:
    beat = 0
    while not stop.wait(lease / 4):
        beat += 1
        try:
            version = replace_if(url, f"{owner} {beat}".encode(), version) or version
        except Exception:  # noqa: BLE001 - a failed renewal is retried at the next beat
            continue

"""Decode many files once each, in worker processes, hashing the bytes as they are read."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from cnn.decode import DecodeError, DecodeSpec, RejectKind, check_decoder_settings, decode_bytes, read_image_bytes

ProgressFn = Callable[[int, int], None]
_INLINE_BELOW = 16  # fewer files than this: worker start-up costs more than it saves


@dataclass(frozen=True)
class DecodeOutcome:
    """The result for one file: a decoded array, a known image (array None), or a reject."""

    path: str
    image_id: str  # sha256 of the file's bytes; "" when the bytes could not be read
    status: str  # "ok" | "rejected"
    reason: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    array: np.ndarray | None = None
    kind: RejectKind | None = None  # why it was rejected, for machines

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_worker_spec: DecodeSpec | None = None
_worker_known: frozenset[str] = frozenset()


def _init_worker(spec: DecodeSpec, known: frozenset[str]) -> None:
    global _worker_spec, _worker_known
    _worker_spec, _worker_known = spec, known


def decode_one(path: str, spec: DecodeSpec, known: frozenset[str] = frozenset()) -> DecodeOutcome:
    """Read, hash and (unless the hash is in `known`) decode one file; never raises for bad input."""
    try:
        data = read_image_bytes(path, spec)
    except DecodeError as exc:
        return DecodeOutcome(path, "", "rejected", exc.reason, kind=exc.kind)
    image_id = hashlib.sha256(data).hexdigest()
    if image_id in known:
        return DecodeOutcome(path, image_id, "ok")
    try:
        image = decode_bytes(data, spec, path)
    except DecodeError as exc:
        return DecodeOutcome(path, image_id, "rejected", exc.reason, kind=exc.kind)
    return DecodeOutcome(path, image_id, "ok", "", image.width, image.height, image.format, image.array)


def _decode_in_worker(path: str) -> DecodeOutcome:
    assert _worker_spec is not None, "worker not initialised"
    return decode_one(path, _worker_spec, _worker_known)


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def decode_many(
    paths: Iterable[str],
    spec: DecodeSpec,
    workers: int = 0,
    known: Iterable[str] = (),
    progress: ProgressFn | None = None,
) -> Iterator[DecodeOutcome]:
    """Yield one DecodeOutcome per path, in input order, decoding in `workers` processes (0 = all cores)."""
    check_decoder_settings()  # in this process too: a setting is an error of the run, not of each file
    paths = [str(p) for p in paths]
    known_set = frozenset(known)
    workers = workers or default_workers()
    total = len(paths)
    if workers <= 1 or total < _INLINE_BELOW:
        outcomes: Iterator[DecodeOutcome] = (decode_one(p, spec, known_set) for p in paths)
        yield from _counted(outcomes, total, progress)
        return
    context = pool_context()
    chunksize = max(1, min(32, total // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(spec, known_set)) as pool:
        yield from _counted(pool.map(_decode_in_worker, paths, chunksize=chunksize), total, progress)


def pool_context() -> multiprocessing.context.BaseContext:
    """fork when this process has a single thread (fast start, nothing to copy mid-flight); otherwise
    (Prefect, notebooks and servers run threads, which fork must not copy) a forkserver, itself
    single-threaded, that has already imported the decoder; spawn where neither exists."""
    methods = multiprocessing.get_all_start_methods()
    if sys.platform == "linux" and threading.active_count() == 1 and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cnn.parallel"])
        return context
    return multiprocessing.get_context("spawn")


def _counted(outcomes: Iterable[DecodeOutcome], total: int, progress: ProgressFn | None) -> Iterator[DecodeOutcome]:
    if progress is not None:
        progress(0, total)
    for done, outcome in enumerate(outcomes, start=1):
        if progress is not None:
            progress(done, total)
        yield outcome

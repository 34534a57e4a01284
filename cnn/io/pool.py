"""Decode many files once each, in worker processes, hashing the bytes as they are read.

One file never stops a batch, whatever it does to the decoder: a file that takes longer than the time limit is
a reject (its worker is killed and the pool rebuilt); when a worker dies (the OOM killer, a signal, a crash in a
native library), the files it may have held are decoded again one by one, each in a process of its own, so the
file that kills its decoder is named ("decoder process died: signal 9") and the others are decoded.

Small files travel in chunks: a worker gets up to `MAX_CHUNK` files (about `CHUNK_BYTES` of them) per task, so a
28 px PNG does not pay a round trip between processes of its own. A chunk that runs past the time limit is not
blamed on any one file: its files are decoded again one task each, where the limit applies per file.

Decoded pixels of a fixed size do not travel back through the pool's pipe: each task slot owns a region of a shared
scratch file (`_Regions`, in /dev/shm where there is one) that its worker writes the arrays into; only the small
facts of each file are pickled. Through the pipe, a 224 px image cost the parent more than decoding it did the
worker (pickling, a dozen pipe round trips, unpickling), and a chunk of them blocked the other worker's results.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import resource
import select
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from cnn import stopping
from cnn.cpus import usable_cpus
from cnn.io.decode import (
    DecodeError,
    DecodeSpec,
    RejectKind,
    check_decoder_settings,
    decode_bytes,
    prefetched,
    read_image_bytes,
)
from cnn.io.storage import client_environment, is_url
from cnn.io.storage import info as storage_info
from cnn.limits import DEFAULT_TIME_LIMIT_S

ProgressFn = Callable[[int, int], None]
DecodeFn = Callable[[str, DecodeSpec, frozenset[str]], "DecodeOutcome"]
START_GRACE_S = 30.0  # what a process of its own may take to start before its file's time limit begins
CHUNK_BYTES = 1 << 20  # files per task: about this many bytes of them...
MAX_CHUNK = 64  # ...but at most this many (a chunk's outcomes come back together)
WORKER_MEMORY_FLOOR = 3 << 30  # address space a decode worker may add, at least (see memory_ceiling)
REGION_MIN_ITEM = 16 << 10  # images at least this large go through the shared regions (smaller ones pickle cheaply)
REGION_BYTES = 8 << 20  # what one task slot's region may hold at most (it caps the files of a chunk)


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
_worker_decode: DecodeFn | None = None


_worker_started: Any = None  # the pool's shared clock: when the task in each slot started running
_worker_regions: tuple[str, np.ndarray] | None = None  # (token, the shared regions as this worker maps them)


def memory_ceiling(spec: DecodeSpec) -> int:
    """The address space one decode worker may add to what it holds at start: room for the largest file, its
    decoded pixels and the decoder's copies (a file allowed by the limits never comes near it)."""
    return max(WORKER_MEMORY_FLOOR, 8 * spec.max_file_bytes)


def limit_worker_memory(extra: int) -> None:
    """Cap this process's address space at what it maps now plus `extra` (RLIMIT_AS): a file that makes a decoder
    allocate without bound fails in this worker (a MemoryError, a reject) instead of taking the host."""
    try:
        ceiling = psutil.Process().memory_info().vms + extra
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(
            resource.RLIMIT_AS, (ceiling if hard == resource.RLIM_INFINITY else min(ceiling, hard), hard)
        )
    except (OSError, ValueError):  # a host that forbids it: the time limit still holds
        pass


def die_with(pid: int) -> None:
    """End this process as soon as process `pid` (the command that started it) ends, however it ends (kill -9, an OOM
    kill, a SIGBUS): a forkserver's worker is the server's child and holds the server open, so neither the kernel's
    parent-death signal nor the server's own exit would end it. A daemon thread waits on a pidfd of `pid`
    (Linux 5.3+; elsewhere it looks once a second)."""
    try:
        handle: int | None = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the process has ended
        else:
            while _alive(pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number: ours is gone
        return False
    return True


def _init_worker(
    spec: DecodeSpec, known: frozenset[str], decode: DecodeFn, env: dict[str, str], parent: int, started: Any
) -> None:
    global _worker_spec, _worker_known, _worker_decode, _worker_started
    die_with(parent)  # no decode worker outlives its command
    limit_worker_memory(memory_ceiling(spec))
    _worker_started = started
    os.environ.update(env)  # a forkserver started earlier has an older environment than this process
    _worker_spec, _worker_known, _worker_decode = spec, known, decode


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


def _decode_in_worker(slot: int, paths: list[str], region: RegionRef | None = None) -> _Packed:
    assert _worker_spec is not None and _worker_decode is not None, "worker not initialised"
    _worker_started[slot] = time.monotonic()  # the limit counts from here, not from the queue (one clock: Linux)
    with prefetched(paths, _worker_spec):  # a chunk of small objects: fetched together, not one by one
        outcomes = [_worker_decode(path, _worker_spec, _worker_known) for path in paths]
    return _Packed.of(outcomes, region)


@dataclass(frozen=True)
class _Packed:
    """A chunk's outcomes as one message: a tuple of plain values per file, and the arrays stacked into one (or
    left in the shared regions): pickling an object and an array per file cost a 28 px PNG a third of its time."""

    facts: list[tuple[str, str, str, int, int, str, str, int]]  # image_id, status, reason, w, h, format, kind, where
    arrays: np.ndarray | list[np.ndarray] | None  # `where` >= 0: this index; <= -2: regions item -2 - where

    @classmethod
    def of(cls, outcomes: list[DecodeOutcome], region: RegionRef | None) -> _Packed:
        items = _mapped_regions(region) if region is not None else None
        facts: list[tuple[str, str, str, int, int, str, str, int]] = []
        kept: list[np.ndarray] = []
        for k, o in enumerate(outcomes):
            where = -1
            if o.array is not None and items is not None and region is not None and o.array.shape == items.shape[1:]:
                items[region.base + k] = o.array
                where = -2 - (region.base + k)
            elif o.array is not None:
                where = len(kept)
                kept.append(o.array)
            facts.append((o.image_id, o.status, o.reason, o.width, o.height, o.format, o.kind or "", where))
        same = bool(kept) and all(a.shape == kept[0].shape for a in kept)
        return cls(facts, np.stack(kept) if same else kept or None)

    def unpack(self, paths: list[str], regions: _Regions | None) -> list[DecodeOutcome]:
        """The outcomes of `paths` (the chunk's, in order); arrays from the regions are copied out of them."""
        outcomes = []
        for path, (image_id, status, reason, width, height, fmt, kind, where) in zip(paths, self.facts):
            array = None
            if where >= 0 and self.arrays is not None:
                array = self.arrays[where]
            elif where <= -2 and regions is not None:
                array = np.array(regions.items[-2 - where])
            outcomes.append(
                DecodeOutcome(
                    path, image_id, status, reason, width, height, fmt, array, RejectKind(kind) if kind else None
                )
            )
        return outcomes


@dataclass(frozen=True)
class RegionRef:
    """Where a task's worker leaves its arrays: the shared regions (by a path any process of this user can open and
    a token naming this set of regions) and the first item of the task's region."""

    path: str
    token: str
    shape: tuple[int, ...]
    base: int


def _mapped_regions(region: RegionRef) -> np.ndarray | None:
    """This worker's map of the shared regions (opened once per set); None where it cannot be opened: the arrays
    then travel through the pipe."""
    global _worker_regions
    if _worker_regions is not None and _worker_regions[0] == region.token:
        return _worker_regions[1]
    try:
        items = np.memmap(region.path, dtype=np.uint8, mode="r+", shape=region.shape)
    except (OSError, ValueError):
        return None
    _worker_regions = (region.token, items)
    return items


class _Regions:
    """The shared scratch file of one decode_many call: `tasks` regions of `per_task` items of `item` shape. Unnamed
    (O_TMPFILE, in /dev/shm where there is one), so nothing is left behind whatever ends the process; workers open it
    through this process's /proc entry."""

    def __init__(self, tasks: int, per_task: int, item: tuple[int, ...]) -> None:
        self.per_task, self.shape = per_task, (tasks * per_task, *item)
        shm = "/dev/shm"
        self.handle = tempfile.TemporaryFile(dir=shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None)
        try:
            # Reserved now, not on first write: a worker writing into a full tmpfs (a container's 64 MB /dev/shm)
            # would die of SIGBUS; here the shortage is an OSError, and the arrays go through the pipe instead.
            os.posix_fallocate(self.handle.fileno(), 0, int(np.prod(self.shape)))
        except BaseException:
            self.handle.close()
            raise
        self.items = np.memmap(self.handle, dtype=np.uint8, mode="r+", shape=self.shape)
        self.path, self.token = f"/proc/{os.getpid()}/fd/{self.handle.fileno()}", uuid.uuid4().hex

    @classmethod
    def for_spec(cls, spec: DecodeSpec, tasks: int, chunk: int) -> _Regions | None:
        """Regions for arrays of `spec`'s fixed size where they are large enough to pay (see REGION_MIN_ITEM), on
        Linux (the /proc entry); else None."""
        if spec.size is None or not sys.platform.startswith("linux"):
            return None
        item = (spec.size, spec.size, spec.channels)
        if int(np.prod(item)) < REGION_MIN_ITEM:
            return None
        try:
            return cls(tasks, chunk, item)
        except OSError:  # no room for the scratch file (or no posix_fallocate here): through the pipe
            return None

    def ref(self, slot: int) -> RegionRef:
        return RegionRef(self.path, self.token, self.shape, slot * self.per_task)

    def close(self) -> None:
        del self.items
        self.handle.close()


def sample_size(paths: Sequence[str]) -> float:
    """The mean size in bytes of up to 32 files (8 objects: each costs a request) spread over `paths` (infinite where
    one cannot be read: no basis for treating them as small)."""
    sizes = []
    many = 8 if paths and is_url(paths[0]) else 32
    for path in paths[:: max(1, len(paths) // many)][:many]:
        try:
            sizes.append(storage_info(path).size if is_url(path) else os.stat(path).st_size)
        except Exception:  # noqa: BLE001 - a missing file, or an object the store will not describe
            return float("inf")
    return sum(sizes) / max(1, len(sizes))


def chunk_size(paths: list[str], workers: int, spec: DecodeSpec | None = None) -> int:
    """Files per task: about CHUNK_BYTES of them by `sample_size` (1 where it is unknown), at most MAX_CHUNK, few
    enough that every worker gets several tasks, and (for a fixed output size) whose arrays fit a REGION_BYTES
    region."""
    by_bytes = int(CHUNK_BYTES // max(sample_size(paths), 1.0))
    busy = -(-len(paths) // (4 * workers))  # ceil: at least four tasks per worker
    by_region = MAX_CHUNK if spec is None or spec.size is None else REGION_BYTES // (spec.size**2 * spec.channels)
    return max(1, min(by_bytes, MAX_CHUNK, busy, by_region))


def default_workers() -> int:
    """All the cores this process may use (its affinity, within its container's CPU quota)."""
    return usable_cpus()


def decode_many(
    paths: Iterable[str],
    spec: DecodeSpec,
    workers: int = 0,
    known: Iterable[str] = (),
    progress: ProgressFn | None = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    decode: DecodeFn = decode_one,
) -> Iterator[DecodeOutcome]:
    """Yield one DecodeOutcome per path, in input order, decoding in `workers` processes (0 = all cores).

    Files are decoded in worker processes (see the module's docstring), except in a daemonic process (a Dask
    worker), which may not start any: there they are decoded here, without the time limit. `decode` is the
    per-file function the workers run (a module-level function, so that it can be sent to them)."""
    check_decoder_settings()  # in this process too: a setting is an error of the run, not of each file
    paths = [str(p) for p in paths]
    known_set = frozenset(known)
    workers = max(1, min(workers or default_workers(), len(paths)))
    if multiprocessing.current_process().daemon:
        yield from _counted((decode(p, spec, known_set) for p in paths), len(paths), progress)
        return
    isolated = _IsolatedPool(paths, spec, known_set, workers, time_limit_s, decode)
    yield from _counted(isolated.outcomes(), len(paths), progress)


class _IsolatedPool:
    """A process pool that survives what files do to it (see the module's docstring)."""

    def __init__(
        self, paths: list[str], spec: DecodeSpec, known: frozenset[str], workers: int, limit: float, decode: DecodeFn
    ) -> None:
        self.paths, self.spec, self.known, self.workers, self.limit, self.decode = (
            paths,
            spec,
            known,
            workers,
            limit,
            decode,
        )
        self.context = pool_context()
        self.env = client_environment()  # what object store clients read: the workers need this process's
        self.pool: _Pool | None = None
        # each task: its files and its slot in the pool's clock of start times (-1: none, never overdue)
        self.running: dict[Future[_Packed], tuple[list[int], int]] = {}
        self.chunk = chunk_size(paths, workers, spec)
        self.regions: _Regions | None = None  # made with the first pool
        self.alone: set[int] = set()  # files of a chunk that ran past the limit: one task each from now on

    def outcomes(self) -> Iterator[DecodeOutcome]:
        """Every path's outcome, in input order, as soon as it and those before it are done."""
        todo, done, emitted = deque(range(len(self.paths))), {}, 0
        try:
            while todo or self.running:
                self._fill(todo)
                done.update(self._collect(todo))
                while emitted in done:
                    stopping.check()  # a safe point: between files
                    yield done.pop(emitted)
                    emitted += 1
        finally:
            self._stop(kill=bool(self.running))
            if self.regions is not None:
                self.regions.close()

    def _fill(self, todo: deque[int]) -> None:
        if self.pool is None:
            self.pool = _reusable_pool(self._key()) or _Pool(
                self.workers, self.context, (self.spec, self.known, self.decode, self.env)
            )
        if self.regions is None:
            self.regions = _Regions.for_spec(self.spec, _Pool.depth(self.workers), self.chunk)
        while todo and len(self.running) < _Pool.depth(self.workers):  # a little queued work keeps workers busy
            chunk = [todo.popleft()]
            while todo and len(chunk) < self.chunk and chunk[0] not in self.alone and todo[0] not in self.alone:
                chunk.append(todo.popleft())
            slot = min(set(range(_Pool.depth(self.workers))) - {s for _, s in self.running.values()})
            self.pool.started[slot] = 0.0  # not started: waiting in the queue or for a worker process to start
            try:
                region = self.regions.ref(slot) if self.regions is not None else None
                future = self.pool.submit(_decode_in_worker, slot, [self.paths[i] for i in chunk], region)
            except BrokenProcessPool:  # a worker died since the last collect: its task's future says which
                todo.extendleft(reversed(chunk))
                if not self.running:  # nothing left to tell the death by: start a fresh pool on the next fill
                    self._stop(kill=True)
                return
            self.running[future] = (chunk, slot)

    def _started(self, slot: int) -> float:
        """When the task in `slot` started running in a worker (0: not yet)."""
        return float(self.pool.started[slot]) if self.pool is not None and slot >= 0 else 0.0

    def _collect(self, todo: deque[int]) -> dict[int, DecodeOutcome]:
        """Wait for the next results; deal with a broken pool or a task past its time limit (counted from when it
        started running: time in the queue or waiting for a new worker process is nobody's fault)."""
        starts = [s for s in (self._started(slot) for _, slot in self.running.values()) if s]
        timeout = max(0.0, min(starts) + self.limit - time.monotonic()) if starts else min(self.limit, 0.5)
        finished, _ = wait(self.running, timeout=timeout, return_when=FIRST_COMPLETED)
        results: dict[int, DecodeOutcome] = {}
        broken = False
        for future in finished:
            chunk, _ = self.running.pop(future)
            try:
                # arrays in the regions are copied out now: the slot's region is free for its next task
                outcomes = future.result().unpack([self.paths[i] for i in chunk], self.regions)
                results.update(zip(chunk, outcomes))
            except BrokenProcessPool:
                broken = True
                self.running[future] = (chunk, -1)  # put back: its files are among the suspects below
        now = time.monotonic()
        overdue = [
            f for f, (_, slot) in self.running.items() if (start := self._started(slot)) and now - start > self.limit
        ]
        if broken:
            suspects = sorted(i for chunk, _ in self.running.values() for i in chunk)
            singles = all(len(chunk) == 1 for chunk, _ in self.running.values())
            self._stop(kill=True)
            if singles:
                results.update({i: self._alone(i) for i in suspects})  # find the file that kills its decoder
            else:  # first one task per file, so that the next death leaves a few suspects, not whole chunks
                self.alone.update(suspects)
                todo.extendleft(reversed(suspects))
        elif overdue:
            again = []
            for future in overdue:
                chunk, _ = self.running.pop(future)
                if len(chunk) == 1:
                    results[chunk[0]] = self._too_slow(chunk[0])
                else:  # which file was slow is not known: each gets the limit on its own
                    self.alone.update(chunk)
                    again += chunk
            again += [i for chunk, _ in self.running.values() for i in chunk]  # not their fault
            todo.extendleft(sorted(again, reverse=True))
            self._stop(kill=True)
        return results

    def _alone(self, i: int) -> DecodeOutcome:
        """Decode one file in a process of its own, to tell a file that kills its decoder from its neighbours."""
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(  # type: ignore[attr-defined]  # every concrete context has Process
            target=_decode_alone,
            args=(sender, self.paths[i], self.spec, self.known, self.decode, self.env, os.getpid()),
            daemon=True,
        )
        process.start()
        sender.close()
        try:
            if receiver.poll(max(self.limit, START_GRACE_S)):  # the process started (or died trying)
                try:
                    receiver.recv()
                except EOFError:
                    pass
            if receiver.poll(self.limit):
                try:
                    outcome: DecodeOutcome = receiver.recv()
                    return outcome
                except EOFError:
                    pass  # it died before answering
            else:
                process.kill()
                return self._too_slow(i)
            process.join(5)
            return _reject(self.paths[i], RejectKind.WORKER_DIED, f"decoder process died: {_exit(process.exitcode)}")
        finally:
            receiver.close()
            process.join(5)

    def _too_slow(self, i: int) -> DecodeOutcome:
        return _reject(
            self.paths[i], RejectKind.TIME_LIMIT, f"decoding took longer than the {self.limit:g}-second limit"
        )

    def _key(self) -> tuple[object, ...]:
        # Not the start method: it follows this process's thread count, which the idle pool's own manager thread
        # changes. A pool reused later starts no process (a fork pool starts all its workers at its first task).
        return (self.workers, self.spec, self.known, self.decode, hash(frozenset(self.env.items())))

    def _stop(self, kill: bool) -> None:
        pool, self.pool = self.pool, None
        self.running.clear()
        if pool is None:
            return
        if not kill:  # healthy and idle: the next call with the same settings (the next shard) takes it over
            _keep_pool(self._key(), pool)
            return
        # Python 3.11 has no public way to end a pool's workers (3.14 adds terminate_workers); a hung or broken
        # pool must not be waited for.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)


# One idle pool is kept for the next call with the same settings: scoring calls decode_many once per shard, and
# starting workers again for every shard costs a few tenths of a second each. Idle workers end with the process.
_idle: tuple[tuple[object, ...], _Pool] | None = None
_idle_lock = threading.Lock()


class _Pool(ProcessPoolExecutor):
    """The decode workers, with a clock they share with this process: when the task in each slot started."""

    def __init__(self, workers: int, context: multiprocessing.context.BaseContext, initargs: tuple[Any, ...]) -> None:
        self.started: Any = context.Array("d", _Pool.depth(workers), lock=False)
        initargs = (*initargs, os.getpid(), self.started)
        super().__init__(workers, mp_context=context, initializer=_init_worker, initargs=initargs)

    @staticmethod
    def depth(workers: int) -> int:
        """Tasks in flight at most: two per worker."""
        return 2 * workers


def _reusable_pool(key: tuple[object, ...]) -> _Pool | None:
    global _idle
    with _idle_lock:
        idle, _idle = _idle, None
    if idle is not None and idle[0] == key and not getattr(idle[1], "_broken", False):  # a worker may die idle
        return idle[1]
    if idle is not None:
        idle[1].shutdown(wait=False, cancel_futures=True)
    return None


def _keep_pool(key: tuple[object, ...], pool: _Pool) -> None:
    global _idle
    with _idle_lock:
        previous, _idle = _idle, (key, pool)
    if previous is not None and previous[1] is not pool:
        previous[1].shutdown(wait=False, cancel_futures=True)


def _decode_alone(
    sender: Any, path: str, spec: DecodeSpec, known: frozenset[str], decode: DecodeFn, env: dict[str, str], parent: int
) -> None:
    die_with(parent)
    os.environ.update(env)
    sender.send(None)  # started: the time limit counts from here, not from the process start
    sender.send(decode(path, spec, known))
    sender.close()


def _reject(path: str, kind: RejectKind, reason: str) -> DecodeOutcome:
    return DecodeOutcome(path, "", "rejected", reason, kind=kind)


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def pool_context() -> multiprocessing.context.BaseContext:
    """fork when this process has a single thread (fast start, nothing to copy mid-flight); otherwise
    (Prefect, notebooks and servers run threads, which fork must not copy) a forkserver, itself
    single-threaded, that has already imported the decoder; spawn where neither exists."""
    methods = multiprocessing.get_all_start_methods()
    if sys.platform == "linux" and threading.active_count() == 1 and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        # "__main__" too: the server imports the main module once, instead of every worker importing it again
        # (for `cnn`, that is the CLI and what it imports)
        context.set_forkserver_preload(["__main__", "cnn.io.pool"])
        return context
    return multiprocessing.get_context("spawn")


def _counted(outcomes: Iterable[DecodeOutcome], total: int, progress: ProgressFn | None) -> Iterator[DecodeOutcome]:
    if progress is not None:
        progress(0, total)
    for done, outcome in enumerate(outcomes, start=1):
        if progress is not None:
            progress(done, total)
        yield outcome

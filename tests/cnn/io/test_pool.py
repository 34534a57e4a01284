"""decode_many: one file never stops a batch, whatever it does to its decoder process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from cnn.io.decode import DecodeSpec, RejectKind
from cnn.io.pool import DecodeOutcome, decode_many, decode_one
from tests.helpers import image_bytes

SPEC = DecodeSpec(channels=3, size=16)


def _dies_on_crash_files(path: str, spec: DecodeSpec, known: frozenset[str]) -> DecodeOutcome:
    """The decoder as a native library crash or the OOM killer leaves it: the process is gone."""
    if "crash" in Path(path).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return decode_one(path, spec, known)


def _hangs_on_slow_files(path: str, spec: DecodeSpec, known: frozenset[str]) -> DecodeOutcome:
    if "slow" in Path(path).name:
        time.sleep(60)
    return decode_one(path, spec, known)


def _files(tmp_path: Path, names: list[str]) -> list[str]:
    rng = np.random.default_rng(0)
    for name in names:
        (tmp_path / name).write_bytes(image_bytes(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
    return [str(tmp_path / name) for name in names]


def test_a_decoder_that_dies_rejects_its_file_and_the_batch_goes_on(tmp_path: Path) -> None:
    names = [f"{i:02d}.png" for i in range(12)]
    names[5], names[9] = "05-crash.png", "09-crash.png"
    paths = _files(tmp_path, names)
    outcomes = list(decode_many(paths, SPEC, workers=2, decode=_dies_on_crash_files))
    assert [o.path for o in outcomes] == paths
    rejected = {Path(o.path).name: o for o in outcomes if not o.ok}
    assert set(rejected) == {"05-crash.png", "09-crash.png"}
    for outcome in rejected.values():
        assert outcome.kind == RejectKind.WORKER_DIED
        assert outcome.reason == "decoder process died: signal 9 (SIGKILL)"
    assert all(o.array is not None and o.array.shape == (16, 16, 3) for o in outcomes if o.ok)


def test_a_file_past_the_time_limit_is_a_reject(tmp_path: Path) -> None:
    names = [f"{i:02d}.png" for i in range(8)]
    names[3] = "03-slow.png"
    paths = _files(tmp_path, names)
    start = time.monotonic()
    outcomes = list(decode_many(paths, SPEC, workers=2, time_limit_s=1.0, decode=_hangs_on_slow_files))
    assert time.monotonic() - start < 20
    assert [o.path for o in outcomes] == paths
    slow = outcomes[3]
    assert not slow.ok and slow.kind == RejectKind.TIME_LIMIT and "1-second limit" in slow.reason
    assert all(o.ok for i, o in enumerate(outcomes) if i != 3)


def _worker_pid(path: str, spec: DecodeSpec, known: frozenset[str]) -> DecodeOutcome:
    return DecodeOutcome(path, str(os.getpid()), "ok")


def test_consecutive_calls_reuse_the_idle_workers(tmp_path: Path) -> None:
    """Scoring decodes shard by shard: the workers of one shard serve the next (no start-up per shard)."""
    paths = _files(tmp_path, ["a.png", "b.png"])
    first = {o.image_id for o in decode_many(paths, SPEC, workers=1, decode=_worker_pid)}
    second = {o.image_id for o in decode_many(paths, SPEC, workers=1, decode=_worker_pid)}
    assert first == second and str(os.getpid()) not in first
    other = {o.image_id for o in decode_many(paths, DecodeSpec(channels=1, size=16), workers=1, decode=_worker_pid)}
    assert other.isdisjoint(first)  # other settings: other workers


def _pid_and_slow(path: str, spec: DecodeSpec, known: frozenset[str]) -> DecodeOutcome:
    if "slow" in Path(path).name:
        time.sleep(60)
    if "crash" in Path(path).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return DecodeOutcome(path, str(os.getpid()), "ok")


def test_small_files_travel_in_chunks_and_a_bad_one_is_still_named(tmp_path: Path) -> None:
    """Small files go to the workers in chunks (one round trip per chunk, not per file); a chunk past the time
    limit, or one whose worker died, is decoded again file by file, so only the bad file is rejected."""
    from cnn.io.pool import chunk_size

    names = [f"{i:03d}.png" for i in range(160)]
    names[37], names[101] = "037-slow.png", "101-crash.png"
    paths = _files(tmp_path, names)
    assert 1 < chunk_size(paths, 2) <= 64
    start = time.monotonic()
    outcomes = list(decode_many(paths, SPEC, workers=2, time_limit_s=1.0, decode=_pid_and_slow))
    assert time.monotonic() - start < 30
    assert [o.path for o in outcomes] == paths
    rejected = {Path(o.path).name: o.kind for o in outcomes if not o.ok}
    assert rejected == {"037-slow.png": RejectKind.TIME_LIMIT, "101-crash.png": RejectKind.WORKER_DIED}
    assert sum(o.ok for o in outcomes) == 158


def test_a_decode_worker_cannot_allocate_past_its_ceiling(tmp_path: Path) -> None:
    """In a process under the worker's limit, an allocation far past it fails there (a MemoryError: a reject),
    instead of taking the host's memory."""
    import subprocess
    import sys

    code = (
        "from cnn.io.pool import limit_worker_memory\n"
        "limit_worker_memory(512 << 20)\n"
        "try:\n    bytearray(4 << 30)\nexcept MemoryError:\n    print('refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "refused", done.stderr[-2000:]


def test_large_arrays_come_back_through_the_shared_regions_intact(tmp_path: Path) -> None:
    from cnn.io.pool import REGION_MIN_ITEM, _Regions

    spec = DecodeSpec(channels=3, size=96)  # 27 KB per image: through the regions
    assert 96 * 96 * 3 >= REGION_MIN_ITEM and _Regions.for_spec(spec, 4, 8) is not None
    rng = np.random.default_rng(3)
    paths = []
    for i in range(40):  # several tasks per slot: each region is written again by later tasks
        (tmp_path / f"{i:02d}.png").write_bytes(image_bytes(rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8)))
        paths.append(str(tmp_path / f"{i:02d}.png"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths.insert(7, str(tmp_path / "bad.png"))
    outcomes = list(decode_many(paths, spec, workers=2))  # kept past the call: copies, not views of the regions
    assert [o.path for o in outcomes] == paths
    assert not outcomes[7].ok and outcomes[7].kind is RejectKind.CORRUPT
    for path, outcome in zip(paths, outcomes):
        if path.endswith("bad.png"):
            continue
        assert outcome.array is not None
        np.testing.assert_array_equal(outcome.array, decode_one(path, spec).array)


def test_a_worker_that_cannot_open_the_regions_sends_its_arrays_through_the_pipe(tmp_path: Path) -> None:
    from cnn.io.pool import RegionRef, _mapped_regions

    assert _mapped_regions(RegionRef(str(tmp_path / "gone"), "t", (4, 8, 8, 3), 0)) is None


def test_without_room_for_the_shared_regions_the_arrays_come_through_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full /dev/shm (a container's 64 MB) must not become workers dying of SIGBUS: the room is reserved up front,
    and where it cannot be, decoding goes on without the regions."""
    import errno

    from cnn.io import pool

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pool.os, "posix_fallocate", no_room)
    spec = DecodeSpec(channels=3, size=96)
    assert pool._Regions.for_spec(spec, 4, 8) is None
    paths = _files(tmp_path, [f"{i:02d}.png" for i in range(6)])
    outcomes = list(decode_many(paths, spec, workers=2))
    assert all(o.ok and o.array is not None and o.array.shape == (96, 96, 3) for o in outcomes)
    np.testing.assert_array_equal(outcomes[3].array, decode_one(paths[3], spec).array)


_HOLDS_WORKERS = """
import sys, threading, time
from pathlib import Path
from cnn.io.decode import DecodeSpec
from cnn.io.pool import decode_many
threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()  # threads: the pool takes a forkserver
paths = sorted(str(p) for p in Path(sys.argv[1]).glob("*.png"))
outcomes = decode_many(paths, DecodeSpec(channels=1, size=16), workers=2)
next(outcomes)  # the workers run
print("ready", flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("death", [signal.SIGKILL, signal.SIGBUS])  # kill -9 or the OOM killer; a bus error
def test_no_decode_process_outlives_its_command(tmp_path: Path, death: signal.Signals) -> None:
    import subprocess
    import sys

    import psutil

    for i in range(40):
        (tmp_path / f"{i:03d}.png").write_bytes(image_bytes(np.full((16, 16), i, np.uint8)))
    command = subprocess.Popen(
        [sys.executable, "-c", _HOLDS_WORKERS, str(tmp_path)], stdout=subprocess.PIPE, cwd=Path(__file__).parents[3]
    )
    assert command.stdout is not None and command.stdout.readline().strip() == b"ready"
    descendants = psutil.Process(command.pid).children(recursive=True)  # forkserver, workers, resource tracker
    assert len(descendants) >= 3, descendants
    command.send_signal(death)
    command.wait()
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]

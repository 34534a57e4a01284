"""Child processes a command starts (the MLflow UI, a local Prefect server) and how a run stops: a child is
stopped with its whole process group when the command stops, and SIGTERM ends a command like Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

TERMINATED = 128 + signal.SIGTERM  # the exit code of a command stopped by SIGTERM


def stop_on_sigterm() -> None:
    """SIGTERM (Kubernetes, Prefect workers, `timeout`) raises SystemExit in the main thread: `finally` blocks and
    atexit handlers run (temporary files removed, children stopped, Prefect's temporary server shut down), where
    the default action would end the process on the spot and orphan its children."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        print("terminated (SIGTERM): stopping", file=sys.stderr, flush=True)
        _kill_decode_workers()
        raise SystemExit(TERMINATED)

    signal.signal(signal.SIGTERM, terminate)


def _kill_decode_workers() -> None:
    """Decode workers come from a multiprocessing forkserver; a worker being started when SIGTERM arrives is not
    yet known to its pool and would wait for work forever. Killing the forkserver and everything it forked
    leaves nothing behind (the decoded files of an unfinished shard are decoded again by the next run)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


def start_group(command: list[str], **popen: object) -> subprocess.Popen[bytes]:
    """Start `command` as the leader of a new process group, so that stopping it stops its own children too."""
    return subprocess.Popen(command, start_new_session=True, **popen)  # type: ignore[call-overload, no-any-return]


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    """SIGTERM to the child's whole group, then SIGKILL to what is left after `timeout_s`."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_group(command: list[str]) -> int:
    """Run `command` in its own process group until it exits or this process is stopped (then it is stopped)."""
    proc = start_group(command)
    try:
        return proc.wait()
    finally:
        stop_group(proc)

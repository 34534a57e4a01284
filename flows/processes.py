"""Child processes a command starts (the MLflow UI, a local Prefect server) and how a run stops: a child is
stopped with its whole process group when the command stops, and SIGTERM ends a command like Ctrl-C does."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

from cnn import stopping
from cnn.stopping import TERMINATED
from flows import watchdog

SIGTERM_GRACE_S = 10.0  # how long a SIGTERM waits for a safe point before the command raises wherever it is
EXIT_GRACE_S = 15.0  # the longest a command's exit waits for threads and atexit handlers (flushes to servers)
# past both, and a little more, native code holds the command: its watchdog ends it with SIGKILL
KILL_AFTER_S = SIGTERM_GRACE_S + EXIT_GRACE_S + 5.0
_watchdog: subprocess.Popen[bytes] | None = None


def guard(kill_after_s: float = KILL_AFTER_S) -> None:
    """What every command sets up first: SIGTERM stops it at a safe point (`stop_on_sigterm`), and a watchdog process
    (flows.watchdog) ends it `kill_after_s` after a SIGTERM that native code kept it from honouring, and stops the
    children it leaves behind (Prefect's throwaway server) however it ends."""
    global _watchdog
    stop_on_sigterm(SIGTERM_GRACE_S)
    if _watchdog is None:
        _watchdog = watchdog.start(kill_after_s)


def stop_on_sigterm(grace_s: float = SIGTERM_GRACE_S) -> None:
    """SIGTERM (Kubernetes, Prefect workers, `timeout`) stops a command the way Ctrl-C does, at a safe point: the
    library's loops stop between files, shards and training steps (`cnn.stopping.check`), `finally` blocks and
    atexit handlers run (children stopped, Prefect's temporary server shut down). Where no safe point comes
    within `grace_s`, or at a second SIGTERM, SystemExit is raised wherever the command is."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        if stopping.requested():  # the second time: now
            _kill_decode_workers()
            raise SystemExit(TERMINATED)
        print("terminated (SIGTERM): stopping", file=sys.stderr, flush=True)
        stopping.request_stop()
        timer = threading.Timer(grace_s, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()

    global _handler
    _handler = terminate
    signal.signal(signal.SIGTERM, terminate)


_handler: Callable[[int, FrameType | None], None] | None = None


@contextmanager
def sigterm_at_safe_points() -> Iterator[None]:
    """Inside a flow started by the `cnn` command, keep its SIGTERM handler: Prefect's flow engine installs one that
    raises wherever the flow is, and an exception inside Prefect's own bookkeeping can turn a clean stop into a
    traceback (seen with Prefect 3.9.1: "Task run is not set"). Runs started by a Prefect worker keep Prefect's
    handler, and with it Prefect's cancellation."""
    if _handler is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                stopping.check()  # a safe point: SIGTERM stops the child group at once
    finally:
        stop_group(proc)


def _leave(status: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def exit_without_teardown(code: object) -> NoReturn:
    """End the command as Python's exit does (other threads joined and thread or process pools shut down, the atexit
    handlers run: Prefect's log and event flush, logging's, multiprocessing's cleanup; the streams flushed), then
    leave without tearing down every module: with torch, MLflow and Prefect loaded, that teardown took over a second
    of every command and does nothing a user needs. `code` is what SystemExit carried (None, a number or a text)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    # Bounded: with its server gone, Prefect's event and log flush retried for minutes after the command had said
    # so (155 s in one run); past EXIT_GRACE_S the command ends without them.
    deadline = threading.Timer(EXIT_GRACE_S, _leave, (status,))
    deadline.daemon = True
    deadline.start()
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what Python's own exit calls first
        atexit._run_exitfuncs()
    finally:
        _leave(status)  # a closed pipe (`cnn ... | head`) leaves nothing more to say

"""A command's watchdog: a small process beside every `cnn` command that makes two promises hold whatever the command
is doing, because it does not need the command's interpreter to keep them.

- **SIGTERM is honoured.** The command stops at a safe point (flows.processes.stop_on_sigterm), bounded by Python's
  own timers. Native code that holds the interpreter (a thread pool spinning on a failed allocation, a regular
  expression that never ends) runs no Python handler and no timer at all: the signal still reaches the watchdog,
  written by the C-level handler to a pipe (`signal.set_wakeup_fd`), and `kill_after_s` later the watchdog ends
  the command with SIGKILL and says so.
- **No child outlives its command.** The watchdog notes the command's child processes as they appear (Prefect's
  throwaway API server, which Prefect starts itself; a local MLflow UI) and, when the command ends however it ends
  (kill -9, the OOM killer, a bus error), stops those still running: SIGTERM, then SIGKILL. Decode workers watch
  their command themselves (cnn.io.pool.die_with).

Run as a file by path with `python -I -S`: only the standard library, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.25  # how often the watchdog looks for new children of the command
STOP_S = 5.0  # how long a child has between SIGTERM and SIGKILL once its command is gone


def start(kill_after_s: float) -> subprocess.Popen[bytes] | None:
    """Start the watchdog of this process (call once, from the main thread, after a Python SIGTERM handler is set:
    the C-level handler writes to the wakeup pipe only for signals that have one). None where it cannot run."""
    if not hasattr(os, "pidfd_open") or not Path("/proc/self/task").is_dir():
        return None  # not Linux (5.3+): the command keeps Python's own bounded stop
    read, write = os.pipe()
    os.set_blocking(write, False)  # the signal handler must never block on a full pipe
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, str(read), str(os.getpid()), f"{kill_after_s:g}"],
            pass_fds=(read,),
            stdin=subprocess.DEVNULL,  # it holds none of the command's streams: a caller reading the command's
            stdout=subprocess.DEVNULL,  # output sees its end when the command ends
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C and a signal to the command's group are the command's, not its own
        )
    except OSError:  # no process to spare (a limit on processes): the command runs without one
        os.close(read)
        os.close(write)
        return None
    os.close(read)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    return watchdog


def _children(pid: int) -> dict[int, str]:
    """The child processes of `pid` now, each with its start time (a pid the kernel reuses has another)."""
    found: dict[int, str] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            listed = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, listed):
            if child != os.getpid() and (stat := _stat(child)) is not None:
                found[child] = stat[1]
    return found


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of process `pid` from /proc/PID/stat (fields 3 and 22), or None where it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()  # counted after the command name
    except OSError:
        return None
    return fields[0], fields[19]


def _running(pid: int, started: str) -> bool:
    """Whether the child noted with start time `started` still runs (not reaped, not a zombie, not a new pid)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[1] == started


def _stop(children: dict[int, str]) -> None:
    """SIGTERM to each child still running (to its whole group where it leads one), SIGKILL after STOP_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = {pid for pid, started in children.items() if _running(pid, started)}
        for pid in alive:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + STOP_S
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {pid for pid in alive if _running(pid, children[pid])}
        if not alive:
            return


def _tell(command: int, line: str) -> None:
    """Write `line` to the command's stderr, wherever it goes (a terminal, a pipe, a log file: appended)."""
    try:
        with open(f"/proc/{command}/fd/2", "a") as stderr:
            print(line, file=stderr, flush=True)
    except OSError:  # closed, or not ours to open
        pass


def watch(wakeup: int, command: int, kill_after_s: float) -> None:
    """Watch `command` until it ends: SIGKILL it `kill_after_s` after a SIGTERM it has not ended by, then stop the
    children it left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Ctrl-C, a process manager's SIGTERM to the group, a closed terminal: the command's to handle; the
        # watchdog stays until the command has ended (it must outlast a SIGTERM to enforce it)
        signal.signal(sig, signal.SIG_IGN)
    try:
        ended = os.pidfd_open(command)
    except OSError:  # gone already
        return
    children: dict[int, str] = {}
    deadline: float | None = None
    watched = [ended, wakeup]
    while True:
        wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        ready = select.select(watched, [], [], wait)[0]
        if ended in ready:
            break
        if wakeup in ready:
            received = os.read(wakeup, 512)
            if not received:  # the command closed its end (it is exec'ing or ending): the pidfd says when
                watched.remove(wakeup)
            elif signal.SIGTERM in received and deadline is None:
                deadline = time.monotonic() + kill_after_s
        children.update(_children(command))
        if deadline is not None and time.monotonic() >= deadline:
            _tell(
                command,
                f"error: the command did not stop within {kill_after_s:g} s of SIGTERM (native code held it); "
                "killed (SIGKILL)",
            )
            os.kill(command, signal.SIGKILL)
            deadline = float("inf")
    _stop(children)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))

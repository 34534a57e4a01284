"""A command's watchdog: SIGTERM ends a command that native code holds, and no child outlives its command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import clean_env

ROOT = Path(__file__).parents[2]

# Native code that keeps the interpreter and never returns: a thread calls pause() through ctypes.PyDLL (which keeps
# the GIL) with SIGTERM blocked, so the signal goes to the main thread, which can then run no Python at all (no
# handler, no timer): what a native thread pool spinning on a failed allocation does to a command.
_HELD_BY_NATIVE_CODE = """
import ctypes, signal, sys, threading
from flows.processes import guard

guard(kill_after_s=float(sys.argv[1]))

def hold():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ctypes.PyDLL(None).pause()

print("ready", flush=True)
threading.Thread(target=hold, daemon=True).start()
threading.Event().wait()
"""


def test_sigterm_ends_a_command_that_native_code_holds() -> None:
    command = subprocess.Popen(
        [sys.executable, "-c", _HELD_BY_NATIVE_CODE, "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert command.stdout is not None and command.stdout.readline().strip() == "ready"
        psutil.Process(command.pid).children()  # the watchdog is there
        command.send_signal(signal.SIGTERM)
        _, stderr = command.communicate(timeout=60)  # before the watchdog: never (the command ignored SIGTERM)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == -signal.SIGKILL
    assert "did not stop within 2 s of SIGTERM (native code held it); killed (SIGKILL)" in stderr


# A command in Prefect's throwaway-server mode: Prefect starts its API server as a child process of the command.
_WITH_PREFECT_SERVER = """
from flows.processes import guard

guard()
from prefect.server.api.server import SubprocessASGIServer

server = SubprocessASGIServer()
server.start()
print(server.server_process.pid, flush=True)
import threading
threading.Event().wait()
"""


@pytest.mark.e2e
@pytest.mark.parametrize("death", [signal.SIGKILL, signal.SIGBUS])  # kill -9 or the OOM killer; a bus error
def test_prefect_s_throwaway_server_does_not_outlive_its_command(tmp_path: Path, death: signal.Signals) -> None:
    env = clean_env(
        tmp_path,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_ENABLED="true",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",  # as the workspace sets it: a loaded host is slow
    )
    command = subprocess.Popen(
        [sys.executable, "-c", _WITH_PREFECT_SERVER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    server: psutil.Process | None = None
    try:
        assert command.stdout is not None
        server = psutil.Process(int(command.stdout.readline()))
        assert "uvicorn" in " ".join(server.cmdline())
        os.kill(command.pid, death)
        command.wait(timeout=30)
        gone, alive = psutil.wait_procs([server], timeout=20)  # before the watchdog: it served on, for good
        assert not alive, " ".join(server.cmdline())
    finally:
        if command.poll() is None:
            command.kill()
        if server is not None and server.is_running():
            server.kill()


_INTERRUPTIBLE = """
import sys, threading
from flows.processes import guard

guard()
print("ready", flush=True)
try:
    threading.Event().wait()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


def _wait_until_running(pid: int) -> None:
    """Until the process has set its own SIGINT disposition (caught or ignored): Python is up and watching."""
    import time

    for _ in range(200):
        status = Path(f"/proc/{pid}/status").read_text()
        masks = {
            line.split(":")[0]: int(line.split()[1], 16)
            for line in status.splitlines()
            if line.startswith(("SigCgt:", "SigIgn:"))
        }
        if (masks["SigCgt"] | masks["SigIgn"]) & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.05)
    raise AssertionError("the watchdog never started")


def test_ctrl_c_to_the_terminal_s_group_is_the_command_s_alone() -> None:
    """Ctrl-C signals the whole foreground group, watchdog included: it leaves the signal to the command (no
    traceback of its own) and ends with it."""
    command = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTIBLE],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert command.stdout is not None and command.stdout.readline().strip() == "ready"
        (watchdog,) = psutil.Process(command.pid).children()
        _wait_until_running(watchdog.pid)
        os.killpg(command.pid, signal.SIGINT)
        _, stderr = command.communicate(timeout=30)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
    assert command.returncode == 130 and stderr.strip() == "interrupted", stderr
    watchdog.wait(timeout=10)  # it ended with its command

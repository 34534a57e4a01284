"""A stop request (SIGTERM) honoured at safe points of long work, never in the middle of someone else's code.

The command line turns SIGTERM into `request_stop()`; the library's loops call `check()` between files, shards
and training steps, which raises SystemExit there. Raising at an arbitrary point instead (inside the
orchestrator's own bookkeeping, say) can leave that bookkeeping broken and the exit unclear.
"""

from __future__ import annotations

import threading

TERMINATED = 143  # 128 + SIGTERM: the exit code of a command stopped by SIGTERM
_requested = threading.Event()


def request_stop() -> None:
    """Ask the running work to stop at its next safe point."""
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise SystemExit(143) when a stop was requested (call between units of work)."""
    if _requested.is_set():
        raise SystemExit(TERMINATED)

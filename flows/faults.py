"""Faults of the infrastructure around a run, told apart from bugs: a full disk, a tracking, orchestration or database
server that does not answer, a locked table, an object store's 5xx, a process without the memory to load its
libraries. `infrastructure_fault` turns such an exception (anywhere in its chain of causes) into a message that
names what failed and where, what to do, and an exit code (cnn.errors); the CLI's boundary prints it instead of a
traceback, and the log filter keeps the traceback out of Prefect's logs. Anything else stays a bug, with its
traceback. docs/operations.md lists each fault, its message and what to do."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from cnn.errors import EXIT_IO, EXIT_OS, InfrastructureError
from cnn.io.storage import redact
from cnn.waits import Waits

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_RERUN = "run the same command again: it carries on where this one stopped, with nothing written twice"
_MLFLOW_DOWN = re.compile(
    r"API request to .* failed with exception|Max retries exceeded|Connection refused|Read timed out", re.S
)
_HTTP_5XX = re.compile(
    r"\b(?:error code|status(?: code)?|HTTP) ?:? ?(5\d\d)\b|\b(5\d\d) (?:Server Error|Service)", re.I
)


def infrastructure_fault(exc: BaseException) -> InfrastructureError | None:
    """The InfrastructureError `exc` amounts to (its message and exit code), or None for anything else."""
    if isinstance(exc, InfrastructureError):
        return exc
    chain = list(_causes(exc))
    for check in (_disk_full, _memory, _database, _mlflow, _prefect, _object_store):
        for link in chain:
            found = check(link)
            if found is not None:
                return found
    return None


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a server did not answer (as opposed to answering "no such thing"): callers that read a
    missing model or alias as an answer must not read a dead server as one."""
    return infrastructure_fault(exc) is not None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        original = getattr(link, "orig", None)  # SQLAlchemy keeps the driver's exception here
        if isinstance(original, BaseException) and id(original) not in seen:
            yield original
            seen.add(id(original))
        link = link.__cause__ or link.__context__


def _disk_full(exc: BaseException) -> InfrastructureError | None:
    text = str(exc)
    full = isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS
    full = full or (isinstance(exc, sqlite3.OperationalError) and "disk is full" in text)
    full = full or "No space left on device" in text or "Disk quota exceeded" in text
    # torch's checkpoint writer reports a short write without the errno ("unexpected pos", "failed writing")
    torch_write = isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)
    if not (full or torch_write):
        return None
    where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    if torch_write:
        where = " writing a checkpoint (torch reports a short write: the disk is most likely full)"
    return InfrastructureError(
        f"no space left on the disk{where}; free space now: {free_space()}. Free some (or point CNN_HOME, "
        f"--output or TMPDIR at a disk with room) and {_RERUN}",
        EXIT_IO,
    )


_PLACES: dict[str, str] = {}  # where this command writes beyond the workspace (an --output folder), by name
_LOW = 64 << 20  # free space under this reads as full


def note_place(name: str, path: str | os.PathLike[str]) -> None:
    """Remember a folder this command writes to (e.g. `--output`), so that a full disk's message shows its room."""
    _PLACES[name] = os.fspath(path)


def free_space() -> str:
    """Free space where a run writes (the workspace, the places the command noted, the temporary folder, the current
    folder), one entry per disk, those nearly full marked."""
    places = {"CNN_HOME": os.environ.get("CNN_HOME", ""), **_PLACES, "temp": tempfile.gettempdir(), "here": "."}
    shown, disks = [], set()
    for name, folder in places.items():
        target = Path(folder).expanduser()
        while not target.exists() and target != target.parent:  # an output not made yet: the disk it would be on
            target = target.parent
        try:
            disk, free = target.stat().st_dev, shutil.disk_usage(target).free
        except OSError:
            continue
        if disk not in disks:
            disks.add(disk)
            shown.append(f"{name} {_size(free)}" + (" (full)" if free < _LOW else ""))
    return ", ".join(shown)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TB"


def _memory(exc: BaseException) -> InfrastructureError | None:
    text = str(exc)
    mapping = isinstance(exc, ImportError) and ("failed to map segment" in text or "cannot allocate memory" in text)
    if not (mapping or isinstance(exc, MemoryError)):
        return None
    limit = _address_space_limit()
    return InfrastructureError(
        "not enough memory or address space to "
        + ("load the libraries (" + text.split(":")[0] + ")" if mapping else "go on")
        + (f"; this shell limits the address space to {limit} (ulimit -v): raise it" if limit else "")
        + ". torch alone maps about 4 GB of address space; CPU-only work needs it too",
        EXIT_OS,
    )


def _address_space_limit() -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return "" if soft == resource.RLIM_INFINITY else _size(soft)


def _database(exc: BaseException) -> InfrastructureError | None:
    # imported here: SQLAlchemy and the driver are loaded by any run that writes a table, not by every command
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    waits = Waits.from_environment()
    if isinstance(exc, PoolTimeout):
        return InfrastructureError(f"no database connection came free within {waits.timeout_s:g} s (CNN_TIMEOUT_S)")
    if not isinstance(exc, DBAPIError) or isinstance(exc.orig, sqlite3.OperationalError) and not _sqlite_busy(exc):
        return None
    code = str(getattr(exc.orig, "sqlstate", "") or "")
    text = str(exc.orig)
    where = _statement_table(str(exc.statement or ""))
    if code == "55P03" or "lock timeout" in text or _sqlite_busy(exc):
        return InfrastructureError(
            f"the table{where} is locked by another session: waited {waits.lock_timeout_s:g} s (CNN_LOCK_TIMEOUT_S). "
            f"Find the session holding it (PostgreSQL: pg_locks joined to pg_stat_activity), end it, and {_RERUN}"
        )
    if code == "53300" or "too many connections" in text or "remaining connection slots" in text:
        refused = _first_line(text)
        return InfrastructureError(f"the database refused a connection: {refused}. Raise its limit or {_RERUN}")
    if code == "57014":
        return InfrastructureError(f"the database cancelled a statement on the table{where}: {_first_line(text)}")
    if isinstance(exc, DBAPIError) and (exc.connection_invalidated or code.startswith("08") or _connection_text(text)):
        return InfrastructureError(
            f"the database did not answer ({_first_line(text)}); check that it is up, then {_RERUN}"
        )
    return None


def _sqlite_busy(exc: BaseException) -> bool:
    original = getattr(exc, "orig", exc)
    return isinstance(original, sqlite3.OperationalError) and "database is locked" in str(original)


def _connection_text(text: str) -> bool:
    words = ("connection refused", "could not connect", "server closed the connection", "timeout expired")
    return any(word in text.lower() for word in words) or "terminating connection" in text


def _statement_table(statement: str) -> str:
    found = re.search(r'(?:FROM|INTO|UPDATE|TABLE)\s+"?([A-Za-z_][\w]*)"?', statement, re.I)
    return f" {found.group(1)}" if found else ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no reason given"


def _mlflow(exc: BaseException) -> InfrastructureError | None:
    module = type(exc).__module__
    text = str(exc)
    down = module.startswith("requests") and type(exc).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout")
    down = down or (module.startswith("mlflow") and bool(_MLFLOW_DOWN.search(text)))
    failing = module.startswith("mlflow") and "API request to" in text and bool(_HTTP_5XX.search(text))
    if not (down or failing):
        return None
    uri = redact(os.environ.get("MLFLOW_TRACKING_URI", ""))
    waits = Waits.from_environment()
    what = "answered with a server error" if failing and not down else "did not answer"
    return InfrastructureError(
        f"the MLflow tracking server at {uri} {what} ({_short(text)}); {waits.describe()}. Start it (or set "
        f"MLFLOW_TRACKING_URI to one that runs), then {_RERUN}"
    )


def _prefect(exc: BaseException) -> InfrastructureError | None:
    text = str(exc)
    module = type(exc).__module__
    reached = isinstance(exc, RuntimeError) and text.startswith("Failed to reach API")
    network = module.startswith(("httpx", "httpcore")) and any(
        word in type(exc).__name__ for word in ("Connect", "Timeout", "Network", "RemoteProtocol")
    )
    status = type(exc).__name__ == "PrefectHTTPStatusError" and bool(re.search(r"'5\d\d ", text))
    if not (reached or network or status):
        return None
    api = os.environ.get("PREFECT_API_URL", "")
    url = _request_url(exc) or api
    if api and url and urlsplit(url).netloc != urlsplit(api).netloc:
        other = redact(url)
        return InfrastructureError(f"the server at {other} did not answer ({_short(text)}); {_RERUN} once it is up")
    where = f" at {redact(api)}" if api else " (the throwaway one this command started)"
    return InfrastructureError(
        f"the Prefect server{where} did not answer ({_short(text)}); "
        f"{Waits.from_environment().describe()}. Start it (`cnn serve`, or unset PREFECT_API_URL for a throwaway "
        f"one), then {_RERUN}. A run it shows as Running is marked Crashed when its heartbeats stop"
    )


def _request_url(exc: BaseException) -> str:
    try:
        return str(exc.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for an error without a request
        return ""


def _object_store(exc: BaseException) -> InfrastructureError | None:
    response = getattr(exc, "response", None)
    status = 0
    if isinstance(response, dict):  # botocore's ClientError
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    text = str(exc)
    delta = type(exc).__module__.startswith("deltalake") and bool(_HTTP_5XX.search(text))
    if not (500 <= status < 600 or delta or "ServiceUnavailable" in text or "SlowDown" in text):
        return None
    return InfrastructureError(
        f"the object store answered with a server error ({_short(text)}); "
        f"{Waits.from_environment().describe()}. When the store is back, {_RERUN}"
    )


def _short(text: str) -> str:
    """An error's text in one short line, without credentials in URLs."""
    line = " ".join(text.split())
    line = re.sub(r"(\w+://)[^/@\s]+@", r"\1", line)
    return line[:240] + ("..." if len(line) > 240 else "")

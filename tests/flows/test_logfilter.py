"""A user error in a Prefect log record stays one line: its traceback is dropped, other errors keep theirs."""

from __future__ import annotations

import logging
import sys

from cnn.errors import UserError
from flows.logfilter import _FILTER


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - the test wants the exception info of whatever it raised
        info = sys.exc_info()
    return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", None, info)


def test_only_user_errors_lose_their_traceback() -> None:
    user, bug = _record(UserError("source not found: x")), _record(KeyError("bug"))
    assert _FILTER.filter(user) and _FILTER.filter(bug)
    assert user.exc_info is None and bug.exc_info is not None


def test_what_prefect_is_sent_holds_no_absolute_path(monkeypatch: object, tmp_path: object) -> None:
    """A crash's traceback names the workspace, the virtualenv and the data; the record the server gets names them
    relative ($CNN_HOME, $VENV) or by the file's name."""
    import os

    from flows.logfilter import _PATHS

    home = "/srv/CANARY-workspace/home"
    os.environ["CNN_HOME"], previous = home, os.environ.get("CNN_HOME")
    try:
        try:
            raise RuntimeError(f"cannot write {home}/runs/x/best.pt nor /data/CANARY-patient/scan.dcm")
        except RuntimeError:
            record = logging.LogRecord(
                "prefect.flow_runs", logging.ERROR, __file__, 1, "crashed in %s", (home,), sys.exc_info()
            )
        assert _PATHS.filter(record)
        shown = logging.Formatter().format(record)
    finally:
        if previous is None:
            del os.environ["CNN_HOME"]
        else:
            os.environ["CNN_HOME"] = previous
    assert "CANARY" not in shown and sys.prefix not in shown and __file__ not in shown, shown
    assert "$CNN_HOME/runs/x/best.pt" in shown and "scan.dcm" in shown and "RuntimeError" in shown

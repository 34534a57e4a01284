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

"""What Prefect's log records carry to the server: one line for a user error (no traceback), and no absolute path
(a crash's traceback names the workspace, the virtualenv and the project): those become $CNN_HOME, $VENV, the
project's relative paths, or the file's name, so Prefect's database, shared with everyone who uses its UI, holds
none."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path

from cnn.errors import UserError

_ABSOLUTE = re.compile(r"(?<![\w:/.~$])/(?:[^\s/\"':,()]+/)+(?=[^\s/\"':,()]*)")  # the folders of an absolute path


def shareable(text: str) -> str:
    """`text` with absolute paths made relative: the workspace, the virtualenv and the working folder by name,
    any other path by its last part."""
    prefixes = {os.environ.get("CNN_HOME", ""): "$CNN_HOME", sys.prefix: "$VENV", os.getcwd(): "."}
    prefixes[str(Path.home())] = "~"
    for prefix, name in sorted(prefixes.items(), key=lambda item: -len(item[0])):
        if len(prefix) > 1:
            text = text.replace(prefix.rstrip("/") + "/", name + "/").replace(prefix, name)
    return _ABSOLUTE.sub("", text)


class _UserErrorFilter(logging.Filter):
    """User errors and faults of the infrastructure (flows.faults) are logged as their one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (isinstance(error, UserError) or _infrastructure(error)):
            record.exc_info = None
            record.exc_text = None
        return True


def _infrastructure(error: BaseException) -> bool:
    # imported here: the classifier loads SQLAlchemy's types, which only a failing run needs
    from flows.faults import infrastructure_fault

    return infrastructure_fault(error) is not None


class _PathFilter(logging.Filter):
    """For the handler that sends records to Prefect's server: message and traceback without absolute paths."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = shareable(record.getMessage()), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = shareable("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return True


_FILTER, _PATHS = _UserErrorFilter(), _PathFilter()


def quiet_user_errors() -> None:
    """Attach the filters to every handler of Prefect's loggers (call after importing prefect): user errors lose
    their traceback everywhere; what goes to the server loses its absolute paths."""
    from prefect.logging.handlers import APILogHandler

    loggers = [logging.getLogger()] + [
        logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict) if name.startswith("prefect")
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
            if isinstance(handler, APILogHandler) and _PATHS not in handler.filters:
                handler.addFilter(_PATHS)

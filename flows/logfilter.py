"""Keep user errors to one line: strip tracebacks from Prefect's log records for UserError."""

from __future__ import annotations

import logging

from cnn.errors import UserError


class _UserErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = _UserErrorFilter()


def quiet_user_errors() -> None:
    """Attach the filter to every handler of Prefect's loggers (call after importing prefect)."""
    loggers = [logging.getLogger()] + [
        logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict) if name.startswith("prefect")
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)

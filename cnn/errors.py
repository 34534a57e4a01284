"""Errors raised for user mistakes and for faults of the infrastructure around a run: the CLI prints their message
and exits non-zero, never with a traceback."""

EXIT_USER = 2  # a mistake in the command or its input
EXIT_OS = 71  # EX_OSERR: not enough memory or address space for the process
EXIT_IO = 74  # EX_IOERR: a disk full or failing
EXIT_TEMPORARY = 75  # EX_TEMPFAIL: a server down or busy, a table locked: the same command works once it is back


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, unusable data); never a bug."""

    exit_code = EXIT_USER


class InfrastructureError(UserError):
    """Something around the run failed (a server that does not answer, a full disk, a locked table), not its input:
    the message says what and where, and a plain re-run completes the work once it is fixed."""

    def __init__(self, message: str, exit_code: int = EXIT_TEMPORARY) -> None:
        super().__init__(message)
        self.exit_code = exit_code

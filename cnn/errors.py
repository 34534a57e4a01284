"""Errors raised for user mistakes: the CLI prints their message and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, unusable data); never a bug."""

    exit_code = 2

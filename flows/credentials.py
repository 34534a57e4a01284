"""Database URLs by reference: flow parameters, logs, MLflow and artifacts never hold a password.

A prediction table is named by `URL#table`, or by a reference the worker resolves when it opens the table:
`env:VARIABLE#table` (an environment variable of the worker holds the URL) or `secret:BLOCK#table` (a Prefect
Secret block holds it). A command given a URL with a password keeps the URL in its own environment and passes
the reference on, so the password never reaches the flow run's parameters.
"""

from __future__ import annotations

import os

from cnn.batch.sql_sink import redact
from cnn.errors import UserError
from cnn.io import credentials as url_credentials

ENV, SECRET = "env:", "secret:"
DEFAULT_TABLE = "default"  # `table: default`: the workspace's table (CNN_PREDICTIONS_URL), else SQLite in CNN_HOME
CLI_VARIABLE = "CNN_TABLE_URL"  # where a command keeps a URL it was given with a password


def has_password(spec: str | None) -> bool:
    """Whether a `URL#table` spec carries a credential: a password in its user info or a credential in its query
    (`?password=`, `?sslpassword=`, `?token=`...); references and plain names do not."""
    if not spec or spec.startswith((ENV, SECRET)) or "://" not in spec:
        return False
    return url_credentials.carries_credentials(spec.partition("#")[0])


def by_reference(spec: str | None) -> str | None:
    """`spec`, with a URL that holds a password moved into this process's environment (CNN_TABLE_URL) and
    replaced by `env:CNN_TABLE_URL#table`: what the flow's parameters then record."""
    if not has_password(spec):
        return spec
    assert spec is not None
    url, _, table = spec.partition("#")
    os.environ[CLI_VARIABLE] = url
    return f"{ENV}{CLI_VARIABLE}" + (f"#{table}" if table else "")


def refuse_passwords(spec: str | None) -> None:
    """Flows refuse a password among their parameters (a deployment given one): say how to pass a reference."""
    if has_password(spec):
        assert spec is not None
        raise UserError(
            f"the table {redact(spec.partition('#')[0])} carries a password in the run's parameters; keep the URL "
            "in the worker's environment or a Prefect Secret block and pass env:VARIABLE#table or secret:BLOCK#table"
        )


def default_table() -> str:
    """The workspace's prediction table: CNN_PREDICTIONS_URL (kept in the environment, so a password never becomes
    a flow parameter), else SQLite under CNN_HOME."""
    from flows import workspace

    default = os.environ.get("CNN_PREDICTIONS_URL") or f"sqlite:///{workspace.current().home / 'predictions.db'}"
    return default if "#" in default else default + "#predictions"


def resolve(spec: str) -> str:
    """The `URL#table` a spec names: references (and `default`) are read here, in the process that opens it."""
    if spec == DEFAULT_TABLE:
        return default_table()
    reference, sep, table = spec.partition("#")
    if reference.startswith(ENV):
        name = reference.removeprefix(ENV)
        url = os.environ.get(name)
        if not url:
            raise UserError(f"the table is named by the environment variable {name}, which is not set here")
    elif reference.startswith(SECRET):
        from prefect.blocks.system import Secret

        name = reference.removeprefix(SECRET)
        try:
            url = str(Secret.load(name).get())
        except ValueError:
            raise UserError(
                f"no Prefect Secret block named {name!r} (create it in the UI or with Secret(...).save)"
            ) from None
    else:
        return spec
    return url + sep + table

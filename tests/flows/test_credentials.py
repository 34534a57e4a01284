"""Database passwords by reference: what flows record holds none; references resolve in the worker; SQLAlchemy's
rendering hides the password, also one with a raw `@`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnn.batch.sql_sink import SqlSink, parse_url, redact
from cnn.errors import UserError
from flows import credentials
from tests.helpers import PG_URL, requires_postgres

URL = "postgresql://alice:s3cr@t-pw@db.example:5432/claims"


def test_redaction_hides_a_password_with_a_raw_at_sign() -> None:
    assert redact(URL) == "postgresql://alice:***@db.example:5432/claims"
    assert parse_url(URL).password == "s3cr@t-pw" and parse_url(URL).host == "db.example"
    assert redact("postgresql://bob:p%40ss@h/db") == "postgresql://bob:***@h/db"
    assert redact("sqlite:////data/preds.db") == "sqlite:////data/preds.db"


def test_a_command_passes_a_reference_and_keeps_the_url_in_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(credentials.CLI_VARIABLE, raising=False)
    reference = credentials.by_reference(f"{URL}#preds")
    assert reference == "env:CNN_TABLE_URL#preds" and "s3cr" not in reference
    assert credentials.resolve(reference) == f"{URL}#preds"
    assert credentials.by_reference("sqlite:///x.db#t") == "sqlite:///x.db#t"  # nothing secret: left as it is
    assert credentials.by_reference("postgresql://alice@db/claims#t") == "postgresql://alice@db/claims#t"


def test_flows_refuse_a_password_among_their_parameters_without_repeating_it() -> None:
    with pytest.raises(UserError, match="env:VARIABLE#table or secret:BLOCK#table") as refused:
        credentials.refuse_passwords(f"{URL}#preds")
    assert "s3cr" not in str(refused.value) and "t-pw" not in str(refused.value)
    credentials.refuse_passwords("env:CNN_TABLE_URL#preds")  # references pass


def test_an_unset_reference_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_DB_URL", raising=False)
    with pytest.raises(UserError, match="environment variable NO_SUCH_DB_URL, which is not set"):
        credentials.resolve("env:NO_SUCH_DB_URL#t")


def test_a_secret_block_names_the_table(prefect_server: None) -> None:
    from prefect.blocks.system import Secret

    Secret(value="sqlite:///:memory:").save("cnn-test-table", overwrite=True)
    assert credentials.resolve("secret:cnn-test-table#preds") == "sqlite:///:memory:#preds"
    with pytest.raises(UserError, match="no Prefect Secret block named 'absent'"):
        credentials.resolve("secret:absent#preds")


@requires_postgres
def test_a_password_with_a_raw_at_sign_connects_and_never_shows(tmp_path: Path) -> None:
    url = PG_URL.replace("postgresql+psycopg://postgres@", "postgresql://postgres:p@ss@")  # trust auth: any password
    sink = SqlSink.from_url(f"{url}#t_unused")
    assert "p@ss" not in " ".join(sink.finish()) and "postgres:***@" in sink.finish()[0]
    with pytest.raises(UserError) as unreachable:
        SqlSink.from_url(url.replace("5432", "1") + "#t")
    assert "p@ss" not in str(unreachable.value) and "ss@" not in str(unreachable.value)

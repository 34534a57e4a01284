"""Credentials in URLs are recognised wherever they sit: the user info and the query string alike."""

from __future__ import annotations

import pytest

from cnn.errors import UserError
from cnn.io import storage
from cnn.io.credentials import carries_credentials, redact, scrub


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://claims@db/claims?password=CANARY",
        "postgresql://claims@db/claims?sslmode=verify-full&sslpassword=CANARY",
        "https://registry.example/api?token=CANARY",
        "az://container/scans?sv=2024-01-01&sig=CANARY",
        "s3://bucket/x.png?X-Amz-Credential=AK&X-Amz-Signature=CANARY",
        "postgresql://claims:CANARY@db/claims",
    ],
)
def test_a_credential_is_seen_in_the_user_info_or_the_query_and_never_shown(url: str) -> None:
    assert carries_credentials(url)
    assert "CANARY" not in redact(url) and "***" in redact(url)
    assert "CANARY" not in scrub(f"connection to {url} failed: CANARY rejected", url)


def test_urls_without_credentials_are_shown_exactly_as_given() -> None:
    for url in ("sqlite:////data/preds.db", "postgresql://claims@db/claims?sslmode=require", "s3://bucket/a b.png"):
        assert not carries_credentials(url) and redact(url) == url


def test_object_store_urls_with_credentials_are_refused_before_anything_is_read() -> None:
    with pytest.raises(UserError, match="never in the URL") as refused:
        storage.refuse_credentials("az://container/scans/?sv=1&sig=CANARY")
    assert "CANARY" not in str(refused.value)
    from cnn.batch.plan import list_inputs

    with pytest.raises(UserError, match="never in the URL"):
        list_inputs("s3://bucket/in/?token=CANARY")

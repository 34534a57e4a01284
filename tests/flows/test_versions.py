"""Naming a registered version: MODEL (its @champion), MODEL@alias, MODEL:version; anything else is refused."""

from __future__ import annotations

import pytest

from cnn.errors import UserError
from flows.versions import parse_spec


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("xray", ("xray", "champion", None)),
        ("xray@challenger", ("xray", "challenger", None)),
        ("xray:3", ("xray", None, "3")),
        ("claims.v2@previous", ("claims.v2", "previous", None)),
    ],
)
def test_specs_name_a_model_and_an_alias_or_a_version(spec: str, parsed: tuple[str, str | None, str | None]) -> None:
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", "xray@", "xray:v3", "../xray", "xray@a@b"])
def test_a_malformed_spec_is_one_clear_error(spec: str) -> None:
    with pytest.raises(UserError, match="use MODEL, MODEL@alias or MODEL:version"):
        parse_spec(spec)

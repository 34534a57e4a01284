"""Output columns written as keyed pseudonyms (`--pseudonymize`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from cnn.errors import UserError
from cnn.io.pseudonyms import pseudonym, pseudonyms


@dataclass(frozen=True)
class Masking:
    """Output columns written as keyed pseudonyms (`--pseudonymize`): carried id columns and, when named, `path`.
    The key stays in the process that writes the rows; it is never a parameter, a log line or a file here."""

    columns: tuple[str, ...] = ()
    key: bytes = field(default=b"", repr=False)

    def path(self, path: str) -> str:
        """A path as the tables show it."""
        return pseudonym(path, self.key) if "path" in self.columns else path

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        masked = frame.copy()
        for column in self.columns:
            if column in masked.columns:
                masked[column] = pseudonyms(masked[column], self.key)
        return masked

    def check(self, id_columns: Sequence[str]) -> None:
        unknown = sorted(set(self.columns) - {"path", *id_columns})
        if unknown:
            raise UserError(
                f"cannot pseudonymize {', '.join(unknown)}: name `path` or columns the manifest carries "
                f"({', '.join(id_columns) or 'none'})"
            )
        if self.columns and not self.key:
            raise UserError("pseudonymizing needs a key")

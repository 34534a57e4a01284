"""How long a command waits on the infrastructure before it says so, defined once: each network request's timeout,
how often a failed request is tried again (with exponential backoff), and how long a table write waits for a lock.

The MLflow and Prefect clients get these through their own settings (`flows.workspace.configure` sets them as
defaults, never over the user's), the SQL tables and object stores through their connections. A user sets them with
CNN_TIMEOUT_S, CNN_RETRIES, CNN_BACKOFF_S and CNN_LOCK_TIMEOUT_S (docs/operations.md)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cnn.errors import UserError

ENVIRONMENT = {  # field: the variable that sets it
    "timeout_s": "CNN_TIMEOUT_S",
    "retries": "CNN_RETRIES",
    "backoff_s": "CNN_BACKOFF_S",
    "lock_timeout_s": "CNN_LOCK_TIMEOUT_S",
}


@dataclass(frozen=True)
class Waits:
    """A request gives up after `timeout_s` without an answer and is tried `retries` more times, `backoff_s`,
    2 x `backoff_s`, 4 x ... apart; a table write waits at most `lock_timeout_s` for another session's lock."""

    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0
    lock_timeout_s: float = 60.0

    @classmethod
    def from_environment(cls) -> Waits:
        """The waits the environment sets (CNN_TIMEOUT_S, ...), the defaults for the others; a value that is not a
        number in range is a UserError."""
        values: dict[str, float | int] = {}
        for field_name, variable in ENVIRONMENT.items():
            raw = os.environ.get(variable, "").strip()
            if not raw:
                continue
            try:
                number = float(raw)
            except ValueError:
                raise UserError(f"{variable}={raw!r} is not a number") from None
            if field_name == "retries":
                if number != int(number) or not 0 <= number <= 10:
                    raise UserError(f"{variable}={raw!r}: give a whole number of tries again from 0 to 10")
                values[field_name] = int(number)
            elif not (math.isfinite(number) and 0 < number <= 3600):
                raise UserError(f"{variable}={raw!r}: give seconds, more than 0 and at most 3600")
            else:
                values[field_name] = number
        return cls(**values)  # type: ignore[arg-type]

    def backoff_total_s(self) -> float:
        """The pauses between the tries of one request, together."""
        return float(sum(self.backoff_s * 2**i for i in range(self.retries)))

    def longest_s(self) -> float:
        """The longest one request can take before it fails: every try timing out, and the pauses between them."""
        return (self.retries + 1) * self.timeout_s + self.backoff_total_s()

    def describe(self) -> str:
        """One line for a message: what the waits were and how to change them."""
        again = f"tried again up to {self.retries} time{'s' if self.retries != 1 else ''}"
        return (
            f"each request waits {self.timeout_s:g} s and is {again}, {self.backoff_s:g} s apart and doubling "
            "(CNN_TIMEOUT_S, CNN_RETRIES, CNN_BACKOFF_S)"
        )

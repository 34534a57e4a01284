"""Limits that more than one stage applies, defined once (each stage imports them; a config's default is one)."""

from __future__ import annotations

MAX_FILE_MB = 256  # a larger file is rejected before it is read; the limit travels with every model (its contract)
DEFAULT_MAX_FILE_BYTES = MAX_FILE_MB * 1024 * 1024
DEFAULT_TIME_LIMIT_S = 60.0  # seconds one file may take to decode; a 50-megapixel JPEG decodes in well under a second
MAX_SOURCE_ENTRIES = 2_000_000  # files, folders or objects one source may list; more is refused, not walked for hours
# what time travel in the Delta prediction tables reaches back to after a vacuum (Delta's own default: 7 days); a
# shorter retention could delete the files of a run still writing
VACUUM_RETAIN_HOURS = 168

"""Keyed pseudonyms (HMAC-SHA256) for identifiers that must not leave their owner: a patient id used as the split
group, a claim number carried to the predictions. The same value under the same key always gives the same
pseudonym, so tables still join to records through whoever holds the key; without the key the value cannot be
recovered or confirmed by guessing."""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Iterable

from cnn.io.decode import open_regular_file
from cnn.io.storage import is_url, read_object

PREFIX = "p-"


def pseudonym(value: str, key: bytes) -> str:
    """The pseudonym of one value: `p-` and 32 hex digits of HMAC-SHA256(key, value)."""
    return PREFIX + hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def pseudonyms(values: Iterable[object], key: bytes) -> list[str | None]:
    """Pseudonyms of many values; missing ones (None, NaN, "") stay missing."""
    return [None if _blank(v) else pseudonym(str(v), key) for v in values]


def dicom_tag(path: str, tag: str) -> str | None:
    """The value of one DICOM tag (e.g. PatientID) from the file's header, without reading its pixels; None when
    the file has no such tag or is not DICOM."""
    # imported here: heavy; DICOM files only
    import pydicom

    try:
        if is_url(path):  # the header is near the start, but its length is unknown: the object's bytes
            ds = pydicom.dcmread(io.BytesIO(read_object(path)), stop_before_pixels=True, specific_tags=[tag])
        else:
            with open_regular_file(path) as handle:
                ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=[tag])
    except Exception:  # noqa: BLE001 - unreadable, not DICOM, or a header pydicom cannot parse: no group
        return None
    value = ds.get(tag)
    return None if value is None or _blank(str(value)) else str(value).strip()


def _blank(value: object) -> bool:
    return value is None or value != value or str(value).strip() == ""  # None, NaN, ""

"""Keyed pseudonyms: the same value and key give the same pseudonym, another key another one; blanks stay blank;
a DICOM tag is read from the header alone."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np

from cnn.io.pseudonyms import dicom_tag, pseudonym, pseudonyms
from tests.helpers import image_bytes, write_dicom


def test_a_pseudonym_is_the_keyed_hash_and_hides_the_value() -> None:
    assert pseudonym("CLAIM-007", b"k1") == "p-" + hmac.new(b"k1", b"CLAIM-007", hashlib.sha256).hexdigest()[:32]
    assert pseudonym("CLAIM-007", b"k1") == pseudonym("CLAIM-007", b"k1") != pseudonym("CLAIM-007", b"k2")
    assert "007" not in pseudonym("CLAIM-007", b"k1")
    assert pseudonyms(["a", None, float("nan"), " ", "a"], b"k")[1:4] == [None, None, None]


def test_dicom_tags_are_read_from_the_header_and_other_files_have_none(tmp_path: Path) -> None:
    scan = write_dicom(tmp_path / "scan.dcm", np.zeros((8, 8), np.uint8), "PAT-42")
    assert dicom_tag(str(scan), "PatientID") == "PAT-42"
    assert dicom_tag(str(scan), "AccessionNumber") is None
    (tmp_path / "photo.png").write_bytes(image_bytes(np.zeros((8, 8, 3), np.uint8)))
    assert dicom_tag(str(tmp_path / "photo.png"), "PatientID") is None

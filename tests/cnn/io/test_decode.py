"""The one decoder: formats by content, odd modes, EXIF, DICOM, and every kind of bad input."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from cnn.errors import UserError
from cnn.io.decode import (
    DecodeError,
    DecodeSpec,
    RejectKind,
    decode_bytes,
    decode_file,
    read_dicom_frame,
    read_image_bytes,
    sniff_format,
    stable_message,
)
from cnn.io.pool import decode_many
from tests.helpers import image_bytes

RGB = DecodeSpec(channels=3)
GRAY = DecodeSpec(channels=1)


def _noise(h: int = 32, w: int = 32, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize(
    "fmt,expected",
    [("PNG", "PNG"), ("JPEG", "JPEG"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("WEBP", "WEBP"), ("GIF", "GIF")],
)
def test_each_format_decodes_by_content(fmt: str, expected: str) -> None:
    out = decode_bytes(image_bytes(_noise(20, 30), fmt), RGB)
    assert out.format == expected
    assert out.array.shape == (20, 30, 3) and out.array.dtype == np.uint8
    assert (out.width, out.height) == (30, 20)


def test_wrong_extension_with_valid_content_decodes(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    pixels = _noise()
    path.write_bytes(image_bytes(pixels, "PNG"))
    out = decode_file(path, RGB)
    assert out.format == "PNG"
    np.testing.assert_array_equal(out.array, pixels)  # PNG is lossless: exact pixels


def test_gif_uses_first_frame() -> None:
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    buffer = io.BytesIO()
    red.save(buffer, "GIF", save_all=True, append_images=[blue])
    out = decode_bytes(buffer.getvalue(), RGB).array
    assert out[..., 0].min() > 200 and out[..., 2].max() < 50


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    cmyk.save(buffer, "JPEG", quality=95)
    out = decode_bytes(buffer.getvalue(), RGB).array
    assert out.shape == (16, 16, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_palette_with_transparency_is_flattened_on_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))  # left half red, right half index 0 = transparent black
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    out = decode_bytes(buffer.getvalue(), RGB).array
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 7]) == (255, 255, 255)  # transparent shows white, not the hidden black


def test_rgba_alpha_composited() -> None:
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 2] = 255
    pixels[:, :2, 3] = 255  # left opaque blue, right fully transparent
    out = decode_bytes(image_bytes(pixels), RGB).array
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 3]) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 4095, 64, dtype=np.float64).astype(np.uint16).reshape(8, 8)  # 12-bit data
    out = decode_bytes(image_bytes(ramp), GRAY).array[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 50  # a clip at 255 would leave almost everything saturated
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order preserved


def test_one_bit_image() -> None:
    image = Image.new("1", (8, 8), 0)
    image.paste(1, (0, 0, 4, 8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    out = decode_bytes(buffer.getvalue(), GRAY).array[..., 0]
    assert out[0, 0] == 255 and out[0, 7] == 0


def test_rgb_to_gray_and_gray_to_rgb() -> None:
    gray = decode_bytes(image_bytes(_noise()), GRAY).array
    assert gray.shape == (32, 32, 1)
    rgb = decode_bytes(image_bytes(_noise(c=1)[..., 0]), RGB).array
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_exif_orientation_is_applied() -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255  # left half white in the stored pixels
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    out = decode_bytes(buffer.getvalue(), GRAY)
    assert (out.width, out.height) == (20, 40)
    assert out.array.shape == (40, 20, 1)
    expected = np.rot90(stored[..., 0], k=-1)  # clockwise: the left half ends up on top
    assert np.abs(out.array[..., 0].astype(int) - expected).mean() < 10


def test_pad_keeps_whole_image_and_crop_fills() -> None:
    wide = np.full((50, 100, 3), 255, dtype=np.uint8)
    padded = decode_bytes(image_bytes(wide), DecodeSpec(channels=1, size=32, resize="pad")).array[..., 0]
    cropped = decode_bytes(image_bytes(wide), DecodeSpec(channels=1, size=32, resize="crop")).array[..., 0]
    assert padded.shape == cropped.shape == (32, 32)
    assert padded[0].max() == 0 and padded[16].min() == 255  # black bars top and bottom
    assert cropped.min() == 255


def test_jpeg_draft_decode_matches_full_decode() -> None:
    big = np.kron(_noise(30, 40, seed=3), np.ones((16, 16, 1), dtype=np.uint8))  # 480x640
    data = image_bytes(big, "JPEG", quality=95)
    spec = DecodeSpec(channels=3, size=64)
    fast = decode_bytes(data, spec).array.astype(int)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 48), Image.Resampling.BILINEAR))
    assert np.abs(fast[8:56] - full.astype(int)).mean() < 6


BAD_INPUTS = {
    "empty": (b"", "empty file"),
    "text": (b"just some notes about the claim\n", "text file"),
    "html": (b"<!DOCTYPE html><html><body>login</body></html>", "HTML"),
    "pdf": (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
    "garbage": (bytes(range(256)) * 4, "unrecognised"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_non_images_are_rejected_with_a_reason(kind: str) -> None:
    data, reason = BAD_INPUTS[kind]
    with pytest.raises(DecodeError, match=reason):
        decode_bytes(data, RGB)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected(fmt: str) -> None:
    data = image_bytes(_noise(64, 64), fmt)
    with pytest.raises(DecodeError, match=f"(truncated|corrupt) {fmt}"):
        decode_bytes(data[: len(data) // 2], RGB)


def test_decompression_bomb_warning_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    data = image_bytes(_noise(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: Pillow warns, we refuse
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_bytes(data, RGB)


def test_pixel_limit_from_spec() -> None:
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_bytes(image_bytes(_noise(40, 40)), DecodeSpec(max_pixels=1000))


def test_file_size_limit_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(image_bytes(_noise()))
    with pytest.raises(DecodeError, match="file too large") as large:
        decode_file(path, DecodeSpec(max_file_bytes=100))
    with pytest.raises(DecodeError, match="file not found") as missing:
        decode_file(tmp_path / "missing.png", RGB)
    assert (large.value.kind, missing.value.kind) == (RejectKind.TOO_LARGE, RejectKind.NOT_FOUND)


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"", RejectKind.EMPTY),
        (b"<!DOCTYPE html><html></html>", RejectKind.NOT_AN_IMAGE),
        (b"%PDF-1.7 ...", RejectKind.NOT_AN_IMAGE),
        (bytes(range(256)) * 4, RejectKind.UNRECOGNISED),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, RejectKind.CORRUPT),
    ],
)
def test_every_reject_carries_a_machine_readable_kind(data: bytes, kind: RejectKind) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_bytes(data, RGB)
    assert caught.value.kind == kind and caught.value.reason


def test_truncated_kind_and_reject_outcomes_carry_it(tmp_path: Path) -> None:
    data = image_bytes(_noise(64, 64), "PNG")
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    outcome = next(decode_many([str(tmp_path / "half.png")], RGB, workers=1))
    assert outcome.status == "rejected" and outcome.kind == RejectKind.TRUNCATED


def test_load_truncated_images_setting_stops_the_run_instead_of_rejecting_every_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A process-wide Pillow setting is checked once, outside the decoder's catch-all: one clear error, no
    batch of files all rejected as 'corrupt'."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UserError, match="LOAD_TRUNCATED_IMAGES"):
        decode_bytes(image_bytes(_noise()), RGB)
    (tmp_path / "a.png").write_bytes(image_bytes(_noise()))
    with pytest.raises(UserError, match="LOAD_TRUNCATED_IMAGES"):
        list(decode_many([str(tmp_path / "a.png")], RGB, workers=1))


def test_sniff_rejects_unknown() -> None:
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + b"\0" * 10) == "PNG"
    with pytest.raises(DecodeError):
        sniff_format(b"\x00\x01\x02\x03")


def _dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    syntax: str | None = None,
    window: tuple[float, float] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax) if syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    else:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_monochrome2_and_inverted_monochrome1() -> None:
    ramp = np.tile(np.linspace(0, 4000, 16).astype(np.uint16), (16, 1))
    normal = decode_bytes(_dicom_bytes(ramp), GRAY)
    inverted = decode_bytes(_dicom_bytes(ramp, "MONOCHROME1"), GRAY)
    assert normal.format == "DICOM" and (normal.width, normal.height) == (16, 16)
    assert normal.array[0, 0, 0] == 0 and normal.array[0, -1, 0] == 255
    np.testing.assert_array_equal(inverted.array, 255 - normal.array)


def test_dicom_rescale_and_window() -> None:
    stored = np.tile(np.arange(0, 4000, 250, dtype=np.uint16), (16, 1))  # 0..3750
    # HU = stored*1 - 1000: window centre 0 width 1000 -> [-500, 500] HU -> stored [500, 1500]
    out = decode_bytes(_dicom_bytes(stored, window=(0, 1000), intercept=-1000), GRAY).array[0, :, 0]
    assert out[stored[0] <= 500].max() == 0
    assert out[stored[0] >= 1500].min() == 255
    assert 0 < out[list(stored[0]).index(1000)] < 255


def test_compressed_dicom_without_codec_is_rejected() -> None:
    data = _dicom_bytes(np.zeros((8, 8), np.uint16), syntax="1.2.840.10008.1.2.4.100")  # MPEG2: no plugin decodes it
    with pytest.raises(DecodeError, match="needs a codec plugin") as caught:
        decode_bytes(data, GRAY)
    assert caught.value.kind == RejectKind.MISSING_CODEC


def test_the_codecs_pacs_exports_use_are_installed() -> None:
    """JPEG baseline and lossless, JPEG-LS, JPEG 2000 and RLE decode through pydicom's maintained plugins (the lock
    installs pylibjpeg with its OpenJPEG and RLE plugins, pyjpegls and python-gdcm; never the GPL libjpeg plugin)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        JPEG2000,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )

    for syntax in (
        JPEGBaseline8Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
    ):
        assert get_decoder(syntax).is_available, syntax.name
    garbage = _dicom_bytes(np.zeros((8, 8), np.uint16), syntax=str(JPEGLSLossless))
    with pytest.raises(DecodeError, match="corrupt DICOM data") as caught:  # a codec, but bad data: a plain reject
        decode_bytes(garbage, GRAY)
    assert caught.value.kind == RejectKind.CORRUPT


def test_decode_many_in_workers_keeps_order_and_survives_bad_files(tmp_path: Path) -> None:
    paths = []
    for i in range(20):
        path = tmp_path / f"{i:02d}.png"
        path.write_bytes(b"broken" if i == 7 else image_bytes(_noise(seed=i)))
        paths.append(str(path))
    spec = DecodeSpec(channels=3, size=16)
    parallel = list(decode_many(paths, spec, workers=2))
    inline = list(decode_many(paths, spec, workers=1))
    assert [o.path for o in parallel] == paths
    assert [o.status for o in parallel].count("rejected") == 1 and parallel[7].status == "rejected"
    for a, b in zip(parallel, inline):
        assert a.image_id == b.image_id
        if a.array is not None:
            np.testing.assert_array_equal(a.array, b.array)


# --- only regular files, read within the limit ---------------------------------------------------


def _special_files(tmp_path: Path) -> dict[str, Path]:
    import socket

    fifo = tmp_path / "incoming.fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.close()
    (tmp_path / "to_fifo.png").symlink_to(fifo)
    (tmp_path / "loop_a.png").symlink_to(tmp_path / "loop_b.png")
    (tmp_path / "loop_b.png").symlink_to(tmp_path / "loop_a.png")
    (tmp_path / "folder.png").mkdir()
    return {
        "FIFO": fifo,
        "socket": sock,
        "symlink to a FIFO": tmp_path / "to_fifo.png",
        "device": Path("/dev/zero"),
        "symlink loop": tmp_path / "loop_a.png",
        "directory": tmp_path / "folder.png",
    }


def test_special_files_are_rejected_at_once_and_never_read(tmp_path: Path) -> None:
    """A FIFO with no writer used to hang the run; /dev/zero used to stream until MemoryError."""
    files = _special_files(tmp_path)
    start = time.monotonic()
    outcomes = {name: next(decode_many([str(path)], RGB, workers=1)) for name, path in files.items()}
    assert time.monotonic() - start < 5
    for name, outcome in outcomes.items():
        assert outcome.status == "rejected" and outcome.kind == RejectKind.NOT_A_FILE, (name, outcome.reason)
    assert "(FIFO)" in outcomes["FIFO"].reason and "(symlink loop)" in outcomes["symlink loop"].reason
    assert "(character device)" in outcomes["device"].reason and "(socket)" in outcomes["socket"].reason


def test_special_files_do_not_stall_duplicate_marking(tmp_path: Path) -> None:
    from cnn.batch.plan import mark_duplicates

    files = _special_files(tmp_path)
    start = time.monotonic()
    marked = mark_duplicates(pd.DataFrame({"path": [str(p) for p in files.values()]}))
    assert time.monotonic() - start < 5 and (marked["image_id"] == "").all()


def test_at_most_the_limit_plus_one_byte_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(image_bytes(_noise(64, 64)))
    limit = path.stat().st_size - 1
    with pytest.raises(DecodeError, match="file too large") as caught:
        read_image_bytes(path, DecodeSpec(max_file_bytes=limit))
    assert caught.value.kind == RejectKind.TOO_LARGE
    assert read_image_bytes(path, DecodeSpec(max_file_bytes=limit + 1)) == path.read_bytes()


# --- DICOM as hospitals send it, and DICOM that would take a machine down ----------------------------


def _pydicom_test_files() -> list[Path]:
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_every_real_dicom_pydicom_decodes_we_decode_with_the_same_pixels() -> None:
    """pydicom's own corpus of real-world files: dual-personality files (a TIFF header in the preamble, like
    CT_small.dcm), palette colour, multi-frame, big-endian, odd VRs."""
    import warnings

    import pydicom
    from pydicom.pixels import pixel_array

    decoded = 0
    for path in _pydicom_test_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = pixel_array(pydicom.dcmread(path), index=0)
        except Exception:  # noqa: BLE001 - pydicom cannot decode it either: not ours to decode
            continue
        data = path.read_bytes()
        ours = decode_bytes(data, DecodeSpec(channels=1, size=32))  # raises DecodeError for a miss
        assert ours.format == "DICOM", path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read_dicom_frame alone: decode_bytes is what routes them to the log
            frame = read_dicom_frame(data, DecodeSpec())[1]
        np.testing.assert_array_equal(frame, expected, err_msg=path.name)
        decoded += 1
    assert decoded >= 80  # 81 with pydicom 3.0.2's corpus


def test_dual_personality_dicom_is_dicom_not_tiff() -> None:
    ct = next(p for p in _pydicom_test_files() if p.name == "CT_small.dcm")
    data = ct.read_bytes()
    assert data[:4] in (b"II*\x00", b"MM\x00*") and sniff_format(data[:1024]) == "DICOM"


def _multiframe(frames: int, syntax: str | None = None, size: int = 64) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    pixels = np.zeros((frames, size, size), np.uint8)
    pixels[0, :, : size // 2] = 200  # only the first frame has a bright left half
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_multiframe_dicom_decodes_only_the_first_frame() -> None:
    out = decode_bytes(_multiframe(40), DecodeSpec(channels=1)).array[..., 0]
    assert out[:, :32].min() == 255 and out[:, 32:].max() == 0


def test_deflated_dicom_bomb_is_rejected_fast_in_little_memory() -> None:
    """400 frames of 256x256 deflate to a few KB and inflate to 26 MB; past the limit, the file is refused
    before pydicom inflates it (the goal: under a second, under 50 MiB)."""
    import tracemalloc

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = _multiframe(400, DeflatedExplicitVRLittleEndian, size=256)
    assert len(data) < 200_000
    tracemalloc.start()
    start = time.monotonic()
    with pytest.raises(DecodeError, match="deflated DICOM inflates past") as caught:
        decode_bytes(data, DecodeSpec(channels=1, size=32, max_file_bytes=8 * 1024 * 1024))
    seconds, peak = time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert caught.value.kind == RejectKind.DECOMPRESSION_BOMB
    assert seconds < 1.0 and peak < 50 * 1024 * 1024, (seconds, peak)
    # under the limit the same file decodes (its first frame)
    assert decode_bytes(data, DecodeSpec(channels=1, size=32)).format == "DICOM"


def test_reasons_carry_no_memory_addresses() -> None:
    exc = ValueError("cannot identify image file <_io.BytesIO object at 0x7f96a1b2c3d0>")
    assert stable_message(exc) == "cannot identify image file <_io.BytesIO>"


def test_library_warnings_go_to_the_debug_log_with_the_file_name(caplog: pytest.LogCaptureFixture) -> None:
    """pydicom warns (and logs a warning) about this file's VR; a run's terminal shows neither."""
    import logging
    import warnings

    path = next(p for p in _pydicom_test_files() if p.name == "SC_rgb_jpeg.dcm")
    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        decode_bytes(path.read_bytes(), DecodeSpec(channels=3, size=16), str(path))
    assert escaped == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    notes = [r.getMessage() for r in caplog.records if r.name == "cnn.io.decode"]
    assert any(n.startswith("SC_rgb_jpeg.dcm: UserWarning: Expected explicit VR") for n in notes), notes


def test_a_reject_reason_never_quotes_a_value_read_from_the_file(tmp_path: Path) -> None:
    """A malformed WindowCenter holding a name: the reason names the format and the kind of problem, never the
    tag's value (reasons reach the dataset report, the model card, MLflow and Prefect)."""
    from tests.helpers import with_window_center, write_dicom

    path = with_window_center(write_dicom(tmp_path / "scan.dcm", np.full((16, 16), 100), "P-1"), "CANARY^Jane")
    with pytest.raises(DecodeError) as rejected:
        decode_bytes(path.read_bytes(), DecodeSpec(channels=1, size=16))
    assert rejected.value.reason == "corrupt DICOM data (ValueError)" and "CANARY" not in str(rejected.value)

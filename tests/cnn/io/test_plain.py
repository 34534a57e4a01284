"""The fast path for plain PNG and JPEG files gives exactly Pillow's pixels, and leaves every other file to Pillow."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cnn.io import decode as decode_module
from cnn.io.decode import DecodeError, DecodeSpec, RejectKind, decode_bytes
from cnn.io.plain import decode_plain


def _encoded(fmt: str, mode: str, shape: tuple[int, int], **save: object) -> bytes:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    pixels[: shape[0] // 2] //= 3  # some structure, so JPEG's subsampling and smoothing matter
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **save)
    return buffer.getvalue()


def _by_pillow(data: bytes, spec: DecodeSpec, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as patch:
        patch.setattr(decode_module, "decode_plain", lambda *args: None)
        return decode_bytes(data, spec).array


PLAIN = [
    ("PNG", "L", {}),
    ("PNG", "RGB", {}),
    ("PNG", "RGB", {"compress_level": 9}),
    ("JPEG", "L", {"quality": 90}),
    ("JPEG", "RGB", {"quality": 90}),  # 4:2:0
    ("JPEG", "RGB", {"quality": 95, "subsampling": 0}),  # 4:4:4
    ("JPEG", "RGB", {"quality": 75, "subsampling": 1}),  # 4:2:2
    ("JPEG", "RGB", {"quality": 85, "progressive": True}),
]


@pytest.mark.parametrize(("fmt", "mode", "save"), PLAIN)
@pytest.mark.parametrize(
    ("channels", "size", "resize"),
    [(1, None, "pad"), (3, None, "pad"), (1, 28, "pad"), (3, 48, "crop"), (3, 64, "pad"), (1, 224, "pad")],
)
def test_plain_files_decode_to_pillows_pixels(
    fmt: str,
    mode: str,
    save: dict[str, object],
    channels: int,
    size: int | None,
    resize: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _encoded(fmt, mode, (45, 61), **save)
    spec = DecodeSpec(channels=channels, size=size, resize=resize)  # type: ignore[arg-type]
    drafted = fmt == "JPEG" and size == 28  # 61 px to 28: Pillow's draft decodes at half scale
    assert (decode_plain(data, fmt, channels, size, resize, spec.pixel_limit) is None) == drafted
    decoded = decode_bytes(data, spec)
    assert (decoded.width, decoded.height, decoded.format) == (61, 45, fmt)
    np.testing.assert_array_equal(decoded.array, _by_pillow(data, spec, monkeypatch))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _with_chunk(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]  # after IHDR


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # turned: Pillow's path rotates it
    return _encoded("JPEG", "RGB", (30, 40), exif=exif)


NOT_PLAIN = {
    "png with transparency": _with_chunk(_encoded("PNG", "RGB", (20, 20)), _png_chunk(b"tRNS", b"\x00\x00" * 3)),
    "png with EXIF": _with_chunk(_encoded("PNG", "RGB", (20, 20)), _png_chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08")),
    "png with a broken ancillary CRC": _with_chunk(
        _encoded("PNG", "L", (20, 20)), _png_chunk(b"tEXt", b"a\x00b")[:-1] + b"\x00"
    ),
    "palette png": _encoded("PNG", "P", (20, 20)),
    "16-bit png": _encoded("PNG", "I;16", (20, 20)),
    "gray+alpha png": _encoded("PNG", "LA", (20, 20)),
    "png without IEND": _encoded("PNG", "L", (20, 20))[:-12],
    "jpeg with EXIF": _exif_jpeg(),
    "cmyk jpeg": _encoded("JPEG", "CMYK", (20, 20)),
    "truncated jpeg": _encoded("JPEG", "RGB", (64, 64))[:-200],
}


@pytest.mark.parametrize("name", sorted(NOT_PLAIN))
def test_files_that_are_not_plain_go_to_pillow(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = NOT_PLAIN[name]
    fmt = "PNG" if data.startswith(b"\x89PNG") else "JPEG"
    spec = DecodeSpec(channels=3, size=32)
    assert decode_plain(data, fmt, 3, 32, "pad", spec.pixel_limit) is None
    try:
        ours = decode_bytes(data, spec).array
    except DecodeError as exc:  # the verdict is Pillow's: the same reject either way
        with pytest.raises(DecodeError) as pillows:
            _by_pillow(data, spec, monkeypatch)
        assert (exc.kind, exc.reason) == (pillows.value.kind, pillows.value.reason)
        assert name in ("png with a broken ancillary CRC", "png without IEND", "truncated jpeg")
    else:
        np.testing.assert_array_equal(ours, _by_pillow(data, spec, monkeypatch))


def test_a_file_the_c_library_refuses_gets_pillows_reject() -> None:
    png = bytearray(_encoded("PNG", "RGB", (40, 40)))
    idat = png.index(b"IDAT")
    png[idat + 20] ^= 0xFF  # inside the compressed data, under a CRC that no longer matches
    png[idat + 21] ^= 0xFF
    with pytest.raises(DecodeError) as rejected:
        decode_bytes(bytes(png), DecodeSpec(channels=3, size=40))
    assert rejected.value.kind in (RejectKind.CORRUPT, RejectKind.TRUNCATED)


def test_oversize_images_are_pillows_decompression_bombs() -> None:
    data = _encoded("PNG", "L", (40, 40))
    with pytest.raises(DecodeError) as rejected:
        decode_bytes(data, DecodeSpec(channels=1, size=32, max_pixels=1000))
    assert rejected.value.kind is RejectKind.DECOMPRESSION_BOMB

"""Plain PNG and JPEG files decoded without Pillow's per-file Python: the same pixels in a fraction of the time.

Pillow spends about 30 microseconds of Python on every file before and after its C decoder runs (plugin setup,
chunk parsing, EXIF, mode bookkeeping): for a 28 px PNG that is five times the decoding itself. imagecodecs calls
the same C libraries (libpng, libjpeg-turbo) directly and raises an exception where they fail, where OpenCV would
print to the terminal. The fast path takes only files whose pixels cannot differ from Pillow's:

- PNG: 8-bit gray or RGB, every chunk present and whole up to IEND, the CRC of every chunk but IDAT correct (Pillow
  checks those, libpng only warns), and no transparency, EXIF or animation chunk (Pillow treats those specially).
- JPEG: baseline, extended or progressive Huffman coding with 1 or 3 components, ending at its EOI marker (libjpeg
  fills a truncated scan in gray where Pillow refuses it), without EXIF (orientation) or Adobe (colour transform)
  segments, and where Pillow's draft mode would not decode at a reduced scale or straight to gray.

Anything else, and any file the C library refuses, goes to Pillow, which gives the verdict. A test checks the two
paths give identical arrays on every kind of file the fast path takes.
"""

from __future__ import annotations

import math
import struct
import zlib

import imagecodecs
import numpy as np
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_SPECIAL = {b"tRNS", b"eXIf", b"acTL"}  # transparency, EXIF orientation, animation: Pillow's path
_JPEG_SOF_PLAIN = {0xC0, 0xC1, 0xC2}  # Huffman baseline, extended, progressive
_JPEG_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, arithmetic, hierarchical
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length


def decode_plain(
    data: bytes, fmt: str, channels: int, size: int | None, resize: str, pixel_limit: int
) -> tuple[np.ndarray, int, int] | None:
    """The decoded pixels (H, W) or (H, W, 3) and the width and height of a plain PNG or JPEG, or None where the
    file is not plain (see the module's docstring) or the C library refuses it: Pillow's path decides then."""
    header = (
        _png_header(data) if fmt == "PNG" else _jpeg_header(data, channels, size, resize) if fmt == "JPEG" else None
    )
    if header is None:
        return None
    width, height, components = header
    if width * height > min(pixel_limit, Image.MAX_IMAGE_PIXELS or pixel_limit) or width < 1 or height < 1:
        return None  # Pillow's path names the decompression bomb
    try:
        array = imagecodecs.png_decode(data) if fmt == "PNG" else imagecodecs.jpeg8_decode(data)
    except Exception:  # noqa: BLE001 - whatever the C library objects to, Pillow's path gives the verdict
        return None
    expected = (height, width) if components == 1 else (height, width, 3)
    if array.dtype != np.uint8 or array.shape != expected:
        return None
    return array, width, height


def finished(array: np.ndarray, channels: int, size: int | None) -> bool:
    """Whether decoded pixels already have the channels and the (square) size asked for."""
    have = 1 if array.ndim == 2 else array.shape[2]
    return have == channels and (size is None or array.shape[:2] == (size, size))


def _png_header(data: bytes) -> tuple[int, int, int] | None:
    """Width, height and components of a plain PNG (see the module's docstring), else None."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", data[16:29])
    if depth != 8 or colour not in (0, 2):
        return None
    view, at, end = memoryview(data), 8, len(data)
    while at + 12 <= end:
        (length,) = struct.unpack_from(">I", data, at)
        kind = bytes(view[at + 4 : at + 8])
        stop = at + 12 + length
        if stop > end or kind in _PNG_SPECIAL:
            return None
        if kind != b"IDAT":
            (crc,) = struct.unpack_from(">I", data, stop - 4)
            if zlib.crc32(view[at + 4 : stop - 4]) != crc:
                return None
        if kind == b"IEND":
            return width, height, 1 if colour == 0 else 3
        at = stop
    return None  # no IEND: truncated


def _jpeg_header(data: bytes, channels: int, size: int | None, resize: str) -> tuple[int, int, int] | None:
    """Width, height and components of a plain JPEG (see the module's docstring), else None."""
    if not data.startswith(b"\xff\xd8") or not data.endswith(b"\xff\xd9"):
        return None
    at, end, frame = 2, len(data), None
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack_from(">H", data, at + 2)
        segment = data[at + 4 : at + 2 + length]
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker in _JPEG_SOF_OTHER or (marker == 0xE1 and segment.startswith(b"Exif")):
            return None
        if marker == 0xEE and segment.startswith(b"Adobe"):
            return None
        if marker in _JPEG_SOF_PLAIN and len(segment) >= 6:
            height, width, components = struct.unpack_from(">HHB", segment, 1)
            frame = (width, height, components)
        at += 2 + length
    if frame is None or frame[2] not in (1, 3) or 0 in frame[:2]:  # a height of 0 comes later (DNL): Pillow's path
        return None
    width, height, components = frame
    if size is not None and _drafted(width, height, components, channels, size, resize):
        return None
    return frame


def _drafted(width: int, height: int, components: int, channels: int, size: int, resize: str) -> bool:
    """Whether Pillow's path (`cnn.io.decode._draft_jpeg`) would decode this JPEG at a reduced scale or as gray."""
    scale = size / (max(width, height) if resize == "pad" else min(width, height))
    if scale >= 1:
        return False
    if channels == 1 and components == 3:
        return True  # draft("L") decodes only the luma channel
    wanted = (math.ceil(width * scale), math.ceil(height * scale))
    return min(width // wanted[0], height // wanted[1]) >= 2

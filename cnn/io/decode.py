"""The one image decoder: every path (ingest, training, scoring, the MLflow pyfunc) decodes through here.

Formats are recognised by their bytes, never by extension. Every decode runs under the same safety
limits (file size, Pillow's decompression-bomb limit raised as an error, truncated data rejected) and
the same normalisation (EXIF orientation, mode -> 8-bit L or RGB, aspect-preserving resize).
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import re
import stat
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

from cnn.choices import RESIZE_MODES, Resize
from cnn.errors import UserError
from cnn.io.plain import decode_plain, finished
from cnn.io.storage import is_url, read_object
from cnn.limits import DEFAULT_MAX_FILE_BYTES

_log = logging.getLogger(__name__)
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATIONS = {2, 3, 4, 5, 6, 7, 8}  # the EXIF values that flip or turn the image (1 is upright)


class RejectKind(StrEnum):
    """Why a file was rejected, for machines: group and filter by this, never by the human `reason` text."""

    NOT_FOUND = "not_found"
    NOT_A_FILE = "not_a_file"
    PERMISSION_DENIED = "permission_denied"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNRECOGNISED = "unrecognised_format"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    DECOMPRESSION_BOMB = "decompression_bomb"
    OUT_OF_MEMORY = "out_of_memory"
    INVALID_DICOM = "invalid_dicom"
    NO_PIXEL_DATA = "no_pixel_data"
    MISSING_CODEC = "missing_codec"
    TIME_LIMIT = "time_limit"
    WORKER_DIED = "worker_died"
    DUPLICATE = "duplicate"

    @property
    def transient(self) -> bool:
        """Whether the same bytes may decode on another try (an I/O hiccup, a busy machine, a file still
        being written): the next run retries these, up to a limit; the others are final for these bytes."""
        return self in _TRANSIENT


_TRANSIENT = frozenset(
    {
        RejectKind.NOT_FOUND,
        RejectKind.PERMISSION_DENIED,
        RejectKind.UNREADABLE,
        RejectKind.TRUNCATED,
        RejectKind.OUT_OF_MEMORY,
        RejectKind.TIME_LIMIT,
        RejectKind.WORKER_DIED,
    }
)


class DecodeError(Exception):
    """A file that cannot be turned into an image; `reason` is the short text stored in manifests, `kind` its class."""

    def __init__(self, kind: RejectKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class DecodeSpec:
    """What the decoder produces and the limits it enforces."""

    channels: Literal[1, 3] = 3
    size: int | None = None  # side of the square output; None keeps the native size
    resize: Resize = "pad"
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_pixels: int | None = None  # None: Pillow's Image.MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
        if self.size is not None and self.size < 8:
            raise ValueError(f"image size must be at least 8 pixels, not {self.size}")

    @property
    def pixel_limit(self) -> int:
        """The largest number of pixels a source image may have."""
        return self.max_pixels or Image.MAX_IMAGE_PIXELS or 2**31


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: uint8 array of shape (H, W, C) plus facts about the source."""

    array: np.ndarray
    width: int  # source width after EXIF orientation
    height: int
    format: str


def sniff_format(head: bytes) -> str:
    """Name the image format from the first bytes of a file, or raise DecodeError saying what it is."""
    if not head:
        raise DecodeError(RejectKind.EMPTY, "empty file (0 bytes)")
    if head[128:132] == b"DICM":  # first: the 128-byte preamble may itself hold a TIFF header (dual-personality)
        return "DICOM"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    raise _unknown_format(head)


def _unknown_format(head: bytes) -> DecodeError:
    if head.startswith(b"%PDF"):
        return DecodeError(RejectKind.NOT_AN_IMAGE, "not an image: PDF document")
    text = head[:512].lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return DecodeError(RejectKind.NOT_AN_IMAGE, "not an image: HTML page")
    if text.startswith(b"<?xml") or text.startswith(b"<svg"):
        return DecodeError(RejectKind.NOT_AN_IMAGE, "not an image: XML/SVG text (vector images are not supported)")
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head[:512])
    if printable >= 0.95 * min(len(head), 512):
        return DecodeError(RejectKind.NOT_AN_IMAGE, "not an image: text file")
    return DecodeError(RejectKind.UNRECOGNISED, "unrecognised file format")


@contextmanager
def open_regular_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a file for reading only if it is a regular file (symlinks to one are fine); a FIFO, socket, device,
    directory, dangling link or link loop raises DecodeError at once, never blocks and never streams forever."""
    fd, _ = _open_regular(path)
    try:
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def _open_regular(path: str | os.PathLike[str]) -> tuple[int, int]:
    """A read-only descriptor of a regular file and its size (see open_regular_file); DecodeError otherwise."""
    try:
        mode = os.stat(path).st_mode  # before opening: a socket cannot be opened, a device should not be
        if not stat.S_ISREG(mode):
            raise DecodeError(RejectKind.NOT_A_FILE, f"not a regular file ({_file_type(mode)})")
        # O_NONBLOCK: should the path turn into a FIFO meanwhile, opening it returns at once instead of waiting.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DecodeError(RejectKind.NOT_FOUND, "file not found") from None
    except PermissionError:
        raise DecodeError(RejectKind.PERMISSION_DENIED, "permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DecodeError(RejectKind.NOT_A_FILE, "not a regular file (symlink loop)") from None
        raise DecodeError(RejectKind.UNREADABLE, f"cannot read the file: {os.strerror(exc.errno or 0)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError(RejectKind.NOT_A_FILE, f"not a regular file ({_file_type(st.st_mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_regular_file(path: str | os.PathLike[str], limit: int, refuse_over: int | None = None) -> bytes:
    """At most `limit` bytes of a regular file (see open_regular_file), read with plain system calls: for a
    thumbnail, Python's buffered file object cost more than the read. With `refuse_over`, a file whose size is
    larger raises DecodeError (too large) before anything is read."""
    fd, size = _open_regular(path)
    try:
        if refuse_over is not None and size > refuse_over:
            raise _too_large(size, refuse_over)
        # size + 1 first: asking for the limit makes Python allocate a buffer of that size for every file
        data = os.read(fd, min(size + 1, limit))
        while len(data) < limit and len(data) > size:  # it grew since fstat: read on, up to the limit
            more = os.read(fd, limit - len(data))
            if not more:
                break
            data += more
        return data
    except OSError as exc:
        raise DecodeError(RejectKind.UNREADABLE, f"cannot read the file: {os.strerror(exc.errno or 0)}") from None
    finally:
        os.close(fd)


def _file_type(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "directory",
        stat.S_ISFIFO: "FIFO",
        stat.S_ISSOCK: "socket",
        stat.S_ISCHR: "character device",
    }
    return next((name for test, name in {**kinds, stat.S_ISBLK: "block device"}.items() if test(mode)), "special file")


def read_image_bytes(path: str | os.PathLike[str], spec: DecodeSpec) -> bytes:
    """Read a regular file (or an object, by URL) under the size limit (at most `max_file_bytes + 1` bytes are ever
    read); raise DecodeError for missing, unreadable, special or oversize files."""
    if is_url(path):
        data = _read_object(str(path), spec)
    else:
        data = _read_file(path, spec)
    if len(data) > spec.max_file_bytes:  # it grew while we read it
        raise _too_large(len(data), spec)
    return data


_PREFETCHED: dict[str, bytes | BaseException] = {}  # object bytes fetched ahead for the files of one task


@contextmanager
def prefetched(paths: Sequence[str], spec: DecodeSpec, threads: int = 8) -> Iterator[None]:
    """Fetch the objects among `paths` several at a time (each as `read_image_bytes` would: at most
    `max_file_bytes + 1` bytes) for the reads inside the block, so that a task of many small objects waits on the
    network once rather than once per object. What the block does not read is dropped at its end."""
    urls = [p for p in dict.fromkeys(paths) if is_url(p)]
    if len(urls) > 1:

        def fetch(url: str) -> bytes | BaseException:
            try:
                return read_object(url, spec.max_file_bytes)
            except Exception as exc:  # noqa: BLE001 - kept, and raised where the object is read
                return exc

        with ThreadPoolExecutor(min(threads, len(urls))) as pool:
            _PREFETCHED.update(zip(urls, pool.map(fetch, urls)))
    try:
        yield
    finally:
        for url in urls:
            _PREFETCHED.pop(url, None)


def _read_object(url: str, spec: DecodeSpec) -> bytes:
    try:
        found = _PREFETCHED.pop(url, None)
        if isinstance(found, BaseException):
            raise found
        return found if found is not None else read_object(url, spec.max_file_bytes)
    except FileNotFoundError:
        raise DecodeError(RejectKind.NOT_FOUND, "object not found") from None
    except PermissionError:
        raise DecodeError(RejectKind.PERMISSION_DENIED, "access denied") from None
    except Exception as exc:  # noqa: BLE001 - each store's client raises its own types for network trouble
        raise DecodeError(RejectKind.UNREADABLE, f"cannot read the object: {type(exc).__name__}") from None


def _read_file(path: str | os.PathLike[str], spec: DecodeSpec) -> bytes:
    return read_regular_file(path, spec.max_file_bytes + 1, refuse_over=spec.max_file_bytes)


def _too_large(size: int, spec: DecodeSpec | int) -> DecodeError:
    limit = spec if isinstance(spec, int) else spec.max_file_bytes
    return DecodeError(RejectKind.TOO_LARGE, f"file too large: {size} bytes exceeds the {limit}-byte limit")


def check_decoder_settings() -> None:
    """Refuse to decode at all when a process-wide setting makes decoding unsafe (a setting, not a bad file)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise UserError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process, so truncated files would decode "
            "as if whole; unset it (the decoder rejects truncated files instead)"
        )


def decode_bytes(data: bytes, spec: DecodeSpec, source: str = "") -> DecodedImage:
    """Decode image bytes into a normalised uint8 (H, W, C) array, or raise DecodeError. Warnings of the
    libraries (pydicom's VR notes, Pillow's EXIF notes) go to the debug log with the file's name, never to the
    terminal of a normal run."""
    check_decoder_settings()  # outside the try below: a setting must not turn every file into a reject
    if len(data) > spec.max_file_bytes:
        raise _too_large(len(data), spec)
    fmt = sniff_format(data[:1024])
    plain = decode_plain(data, fmt, spec.channels, spec.size, spec.resize, spec.pixel_limit)
    if plain is not None and finished(plain[0], spec.channels, spec.size):  # no warnings to catch: C raises or returns
        array, width, height = plain
        return DecodedImage(
            array=array if array.ndim == 3 else array[:, :, None], width=width, height=height, format=fmt
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _decode(data, spec, fmt, plain)
        finally:
            for note in caught:
                _log.debug("%s: %s: %s", os.path.basename(source) or "<bytes>", note.category.__name__, note.message)


def _decode(data: bytes, spec: DecodeSpec, fmt: str, plain: tuple[np.ndarray, int, int] | None) -> DecodedImage:
    try:
        if plain is not None:  # the same pixels Pillow would decode: Pillow converts and resizes them
            image, width, height = Image.fromarray(plain[0], "L" if plain[0].ndim == 2 else "RGB"), *plain[1:]
        elif fmt == "DICOM":
            image, width, height = _open_dicom(data, spec)
        else:
            image, width, height = _open_pillow(data, fmt, spec)
        image = _to_channels(image, spec.channels)
        if spec.size is not None:
            image = _fit_square(image, spec.size, spec.resize)
        array = np.asarray(image, dtype=np.uint8)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError(RejectKind.OUT_OF_MEMORY, f"{fmt} image too large to decode in memory") from None
    # Decoders fed untrusted bytes raise many exception types (OSError, SyntaxError, ValueError,
    # struct.error, IndexError, zlib.error...); each one means "this file is bad", never "stop the batch".
    except Exception as exc:  # noqa: BLE001 - see the comment above
        raise _describe_failure(fmt, exc) from None
    if array.ndim == 2:
        array = array[:, :, None]
    return DecodedImage(array=np.ascontiguousarray(array), width=width, height=height, format=fmt)


def decode_file(path: str | os.PathLike[str], spec: DecodeSpec) -> DecodedImage:
    """Read and decode one file under `spec`'s limits."""
    return decode_bytes(read_image_bytes(path, spec), spec, str(path))


_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def stable_message(exc: BaseException) -> str:
    """An exception's text without memory addresses, so the same bad file always gets the same reason."""
    return _ADDRESS.sub(r"<\1>", str(exc).strip()) or type(exc).__name__


def _describe_failure(fmt: str, exc: Exception) -> DecodeError:
    """A decoder's failure as a reason from a fixed template: the format, the kind and the exception's type. Never
    the decoder's message, which can quote what the file holds (a DICOM tag's value, an EXIF string), and reasons
    travel to shared stores (reports, the model card, MLflow, Prefect)."""
    truncated = "truncated" in stable_message(exc).lower()  # the decoder's own words: the only signal Pillow gives
    if truncated:
        return DecodeError(RejectKind.TRUNCATED, f"truncated {fmt} data ({type(exc).__name__})")
    return DecodeError(RejectKind.CORRUPT, f"corrupt {fmt} data ({type(exc).__name__})")


def _open_pillow(data: bytes, fmt: str, spec: DecodeSpec) -> tuple[Image.Image, int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DecodeError(
                RejectKind.DECOMPRESSION_BOMB, f"decompression bomb: over {spec.pixel_limit} pixels"
            ) from None
        _check_pixels(image.width * image.height, spec)
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        width, height = image.size
        if orientation in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        if fmt == "JPEG" and spec.size is not None:
            _draft_jpeg(image, spec)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/WebP/TIFF: the first frame
        image.load()
        # only where the EXIF orientation asks for it: for the usual 1, exif_transpose is a copy of the pixels
        oriented: Image.Image = ImageOps.exif_transpose(image) if orientation in _ORIENTATIONS else image
    return oriented, width, height


def _check_pixels(pixels: int, spec: DecodeSpec) -> None:
    if pixels > spec.pixel_limit:
        raise DecodeError(
            RejectKind.DECOMPRESSION_BOMB,
            f"decompression bomb: over {spec.pixel_limit} pixels",
        )


def _draft_jpeg(image: Image.Image, spec: DecodeSpec) -> None:
    """Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) when the target is much smaller."""
    assert spec.size is not None
    w, h = image.size
    scale = spec.size / (max(w, h) if spec.resize == "pad" else min(w, h))
    if scale >= 1:
        return
    mode = "L" if spec.channels == 1 and image.mode in ("L", "RGB", "YCbCr") else None
    image.draft(mode, (math.ceil(w * scale), math.ceil(h * scale)))


def _open_dicom(data: bytes, spec: DecodeSpec) -> tuple[Image.Image, int, int]:
    ds, pixels = read_dicom_frame(data, spec)
    rows, cols = int(ds.Rows), int(ds.Columns)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        gray = _dicom_grayscale(pixels, ds)
        if photometric == "MONOCHROME1":
            gray = 255 - gray  # MONOCHROME1: low values are white
        return Image.fromarray(gray, mode="L"), cols, rows
    if photometric == "PALETTE COLOR":
        # imported here: heavy; DICOM files only
        from pydicom.pixels import apply_color_lut  # type: ignore[attr-defined]  # public, not in __all__

        pixels = np.asarray(apply_color_lut(pixels, ds))
    rgb = pixels if pixels.dtype == np.uint8 else _minmax_to_uint8(pixels.astype(np.float32))
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB"), cols, rows


def read_dicom_frame(data: bytes, spec: DecodeSpec) -> tuple[Any, np.ndarray]:
    """The dataset and its first frame's stored pixels (before any LUT or window), after checking the sizes a
    file declares (pixels, one frame's bytes, the inflated size of deflated data) against `spec`'s limits."""
    # imported here: heavy; DICOM files only
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder, pixel_array  # type: ignore[attr-defined]  # public, not in __all__

    _demote_library_log("pydicom")

    _check_inflated_size(data, spec)  # before pydicom inflates a deflated dataset whole
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, zlib.error) as exc:
        raise DecodeError(RejectKind.INVALID_DICOM, f"invalid DICOM file ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise DecodeError(RejectKind.NO_PIXEL_DATA, "DICOM file has no pixel data")
    rows, cols = int(ds.Rows), int(ds.Columns)
    _check_pixels(rows * cols, spec)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    frame_bytes = rows * cols * samples * max(1, math.ceil(bits / 8))
    if frame_bytes > spec.max_file_bytes:
        raise DecodeError(
            RejectKind.DECOMPRESSION_BOMB,
            f"decompression bomb: one DICOM frame exceeds the {spec.max_file_bytes}-byte limit",
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DecodeError(
                RejectKind.MISSING_CODEC,
                "compressed DICOM needs a codec plugin that is not installed (pylibjpeg or python-gdcm)",
            )
    return ds, np.asarray(pixel_array(ds, index=0))  # the first frame only: never every frame of a large series


class _ToDebug(logging.Filter):
    """Log records of a library at debug level: its notes about odd files are not for a run's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_TO_DEBUG = _ToDebug()


def _demote_library_log(name: str) -> None:
    logger = logging.getLogger(name)  # pydicom logs each warning it also raises (see decode_bytes)
    if _TO_DEBUG not in logger.filters:
        logger.addFilter(_TO_DEBUG)


def _check_inflated_size(data: bytes, spec: DecodeSpec) -> None:
    """A deflated DICOM dataset must not inflate past the file-size limit: inflate it in chunks, keeping none of
    the output, and stop as soon as it passes (a 2 MB file can hold 2 GB)."""
    # imported here: heavy; DICOM files only
    from pydicom.filereader import _read_file_meta_info, read_preamble  # private: the meta reader for a stream
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
    except Exception:  # noqa: BLE001 - not our call to judge: dcmread reports a bad header with its reason
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    body = memoryview(data)[stream.tell() :]
    try:
        for start in range(0, len(body), 1 << 16):
            pending = bytes(body[start : start + (1 << 16)])
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, 1 << 20))
                if total > spec.max_file_bytes:
                    raise DecodeError(
                        RejectKind.DECOMPRESSION_BOMB,
                        f"decompression bomb: deflated DICOM inflates past the {spec.max_file_bytes}-byte limit",
                    )
                pending = inflater.unconsumed_tail
    except zlib.error:
        raise DecodeError(RejectKind.INVALID_DICOM, "invalid DICOM file: corrupt deflated data") from None


def _dicom_grayscale(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT (rescale slope/intercept), then the VOI window, then 0..255."""
    # imported here: heavy; DICOM files only
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # type: ignore[attr-defined]  # public, not in __all__

    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    center, width = _first_value(ds, "WindowCenter"), _first_value(ds, "WindowWidth")
    if center is not None and width is not None and width > 0:
        low = center - width / 2.0
        scaled = np.clip((values - low) / width, 0.0, 1.0) * 255.0
        return np.asarray(np.rint(scaled), dtype=np.uint8)
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float32)
    return _minmax_to_uint8(values)


def _first_value(ds: object, keyword: str) -> float | None:
    value = getattr(ds, keyword, None)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale the image's own range to 0..255 (never clip high-bit-depth data)."""
    values = values.astype(np.float32, copy=False)
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Normalise any Pillow mode to 8-bit L (1 channel) or RGB (3 channels)."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float: scale the range, never clip
        gray = _minmax_to_uint8(np.asarray(image))
        image = Image.fromarray(gray, mode="L")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = _flatten_alpha(image)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent images onto white, so transparent areas don't reveal hidden colours."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _fit_square(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize keeping the aspect ratio: `pad` letterboxes with black, `crop` keeps the centre."""
    w, h = image.size
    if (w, h) == (size, size):  # already the target: letterboxing or cropping would copy it unchanged
        return image
    scale = size / (max(w, h) if mode == "pad" else min(w, h))
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if mode == "crop":
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas

"""The decoder's contract under fuzzing: any bytes give a decoded image of the requested shape or a DecodeError,
nothing else (no other exception, no hang past libFuzzer's -timeout, no memory past -rss_limit_mb)."""

from __future__ import annotations

import numpy as np

from cnn.io.decode import DecodeError, DecodeSpec, decode_bytes

SPEC = DecodeSpec(channels=3, size=32, max_file_bytes=1 << 20, max_pixels=4_000_000)


def check(data: bytes) -> None:
    try:
        image = decode_bytes(data, SPEC, "fuzz-input")
    except DecodeError:
        return
    assert image.array.shape == (32, 32, 3) and image.array.dtype == np.uint8, image.array.shape

"""Coverage-guided fuzzing of the one decoder (atheris, libFuzzer): any bytes must give a decoded image of the
requested shape or a DecodeError, nothing else.

    python fuzz/decode_fuzz.py CORPUS_DIR [libFuzzer options, e.g. -max_total_time=60]

`make fuzz` writes the seed corpus (fuzz/seeds.py: the kinds of files the tests generate) and runs this for
FUZZ_SECONDS. Whatever it finds (a `crash-*` file) goes into fuzz/regressions/, which the test suite decodes.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():  # coverage of our decoder and the Python it calls
    from target import check  # fuzz/target.py: the contract, shared with the regression test


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()

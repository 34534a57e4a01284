"""Coverage-guided fuzzing of the registry loaders (atheris): see fuzz/loaders.py for the contract they keep.

python fuzz/loaders_fuzz.py contract|index CORPUS_DIR [libFuzzer options, e.g. -max_total_time=60]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from loaders import TARGETS, seeds  # fuzz/loaders.py: the contract, shared with the regression test


if __name__ == "__main__":
    target, argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    for folder in corpus[:1]:  # the seeds, written where libFuzzer reads its corpus
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, data in seeds(target).items():
            (Path(folder) / name).write_bytes(data)
    atheris.Setup(argv, TARGETS[target])
    atheris.Fuzz()

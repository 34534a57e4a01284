"""The decoder under fuzzing: every seed and every input the fuzzer ever found (fuzz/regressions/) keeps the
contract, and a short coverage-guided run (atheris) finds nothing (`make fuzz` runs it for longer)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parents[3] / "fuzz"


def _check() -> object:
    spec = importlib.util.spec_from_file_location("fuzz_target", FUZZ / "target.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check


def test_seeds_and_past_findings_keep_the_decoders_contract(tmp_path: Path) -> None:
    sys.path.insert(0, str(FUZZ))
    try:
        import seeds
    finally:
        sys.path.remove(str(FUZZ))
    check = _check()
    inputs = seeds.write(tmp_path / "corpus") + [p for p in (FUZZ / "regressions").iterdir() if p.name != ".keep"]
    assert len(inputs) >= 9
    for path in inputs:
        check(path.read_bytes())  # type: ignore[operator]  # a DecodeError is fine; anything else fails here


@pytest.mark.slow
def test_a_short_fuzzing_run_finds_nothing(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(FUZZ / "seeds.py"), str(tmp_path / "corpus")], check=True)
    run = subprocess.run(
        [sys.executable, str(FUZZ / "decode_fuzz.py"), str(tmp_path / "corpus"), "-max_total_time=5"]
        + ["-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done" in run.stderr and not list(tmp_path.glob("crash-*"))


def _loaders() -> object:
    sys.path.insert(0, str(FUZZ))
    try:
        import loaders
    finally:
        sys.path.remove(str(FUZZ))
    return loaders


@pytest.mark.parametrize("target", ["contract", "index"])
def test_the_contract_and_index_loaders_keep_their_contract_on_mutated_seeds(target: str) -> None:
    """Every seed, every past finding and a few hundred seeded mutations of the seeds (bytes flipped, cut,
    size fields set huge) load as a valid contract or index, or are refused with the loader's own error."""
    import numpy as np

    loaders = _loaders()
    check = loaders.TARGETS[target]  # type: ignore[attr-defined]
    inputs = list(loaders.seeds(target).values())  # type: ignore[attr-defined]
    inputs += [p.read_bytes() for p in (FUZZ / "regressions").glob(f"{target}-*")]
    rng = np.random.default_rng(0)
    for seed in list(inputs):
        for _ in range(150):
            data = bytearray(seed)
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(0, len(data)))
                data[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            inputs.append(bytes(data[: int(rng.integers(1, len(data) + 1))] if rng.random() < 0.2 else data))
    for data in inputs:
        check(data)  # the loader's own error is fine; anything else fails here

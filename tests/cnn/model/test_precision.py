"""The one precision policy, as training, scoring and the benchmarks see it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from cnn.errors import UserError
from cnn.model.precision import (
    BF16_MIN_AGREEMENT,
    BF16_MIN_SPEEDUP,
    PrecisionChoice,
    choose_inference_precision,
    choose_training_precision,
    host_type,
    training_amp,
)

CPU = torch.device("cpu")


def _never() -> float | None:
    raise AssertionError("the agreement was measured where the policy does not need it")


def test_fp32_forced_never_measures() -> None:
    choice = choose_inference_precision("fp32", CPU, _never)
    assert choice.name == "fp32" and choice.autocast_dtype is None


def test_bf16_forced_reports_the_measured_agreement_instead_of_falling_back() -> None:
    choice = choose_inference_precision("bf16", CPU, lambda: 0.5)
    assert choice.name == "bf16" and choice.agreement == 0.5 and choice.autocast_dtype == torch.bfloat16
    assert "0.5000" in choice.describe()


@pytest.mark.parametrize(
    "agreement,expected", [(1.0, "bf16"), (BF16_MIN_AGREEMENT, "bf16"), (0.99, "fp32"), (None, "fp32")]
)
def test_auto_applies_the_agreement_check(
    monkeypatch: pytest.MonkeyPatch, agreement: float | None, expected: str
) -> None:
    monkeypatch.setattr("cnn.model.precision.cpu_bf16_available", lambda: True)
    assert choose_inference_precision("auto", CPU, lambda: agreement, lambda: 2.0).name == expected


def test_auto_without_native_bf16_stays_fp32_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cnn.model.precision.cpu_bf16_available", lambda: False)
    choice = choose_inference_precision("auto", CPU, _never)
    assert choice.name == "fp32" and "no native bf16" in choice.reason


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="auto, fp32, bf16"):
        choose_inference_precision("fp8", CPU, _never)


def test_cpu_training_needs_no_scaler_in_either_precision() -> None:
    for name, want in (("fp32", None), ("bf16", torch.bfloat16)):
        dtype, scaler = training_amp(CPU, PrecisionChoice(name, "forced"))  # type: ignore[arg-type]
        assert dtype == want and not scaler.is_enabled()


@pytest.mark.parametrize("speedup,expected", [(1.6, "bf16"), (1.05, "fp32"), (0.59, "fp32"), (None, "fp32")])
def test_cpu_training_takes_bf16_only_where_its_steps_ran_faster(
    monkeypatch: pytest.MonkeyPatch, speedup: float | None, expected: str
) -> None:
    monkeypatch.setattr("cnn.model.precision.cpu_bf16_available", lambda: True)
    choice = choose_training_precision("auto", CPU, True, lambda: speedup)
    assert choice.name == expected and choice.speedup == speedup
    assert choose_training_precision("fp32", CPU, True, _never).name == "fp32"  # forced: nothing timed
    assert choose_training_precision("bf16", CPU, True, _never).name == "bf16"
    monkeypatch.setattr("cnn.model.precision.cpu_bf16_available", lambda: False)
    assert choose_training_precision("auto", CPU, True, _never).reason == "this CPU has no native bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_policy() -> None:
    cuda = torch.device("cuda")
    assert choose_inference_precision("fp32", cuda, _never).autocast_dtype is None
    assert choose_inference_precision("auto", cuda, _never).name in ("bf16", "fp16")
    dtype, scaler = training_amp(cuda, choose_training_precision("auto", cuda, True, _never))
    assert dtype in (torch.bfloat16, torch.float16) and scaler.is_enabled() == (dtype == torch.float16)


@pytest.mark.parametrize(
    "speedup,expected", [(2.0, "bf16"), (BF16_MIN_SPEEDUP, "bf16"), (0.59, "fp32"), (1.05, "fp32"), (None, "fp32")]
)
def test_auto_picks_bf16_only_where_it_is_faster_on_this_host(
    monkeypatch: pytest.MonkeyPatch, speedup: float | None, expected: str
) -> None:
    """On a CPU with AVX512-BF16 but no AMX, bf16 ran at 0.59x fp32: agreeing is not enough."""
    monkeypatch.setattr("cnn.model.precision.cpu_bf16_available", lambda: True)
    choice = choose_inference_precision("auto", CPU, lambda: 1.0, lambda: speedup)
    assert choice.name == expected and choice.speedup == speedup
    if speedup is not None:
        assert f"{speedup:.2f}x" in choice.describe() and host_type() in choice.describe()


def test_speed_is_not_measured_when_bf16_disagrees_or_is_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cnn.model.precision.cpu_bf16_available", lambda: True)
    assert choose_inference_precision("auto", CPU, lambda: 0.9, _never).name == "fp32"
    assert choose_inference_precision("bf16", CPU, lambda: 0.9, _never).name == "bf16"


def test_host_type_names_the_bf16_units_and_threads() -> None:
    kind = host_type()
    assert kind.split("-")[1] in ("amx", "avx512bf16", "nobf16") and kind.endswith(f"-{torch.get_num_threads()}t")


def test_bf16_speedup_times_both_precisions_on_a_real_model() -> None:
    from cnn.infer.predictor import Predictor, bf16_speedup
    from cnn.model.contract import ModelContract
    from cnn.model.networks import create_model

    contract = ModelContract("small_cnn", ["a", "b"], 3, 32, "pad", [0.5] * 3, [0.25] * 3)
    predictor = Predictor(create_model("small_cnn", num_classes=2, in_channels=3).eval(), contract, CPU)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    measured = bf16_speedup(predictor, images, batch_size=16, rounds=1)
    assert measured is not None and 0.01 < measured < 100
    assert bf16_speedup(predictor, images[:0]) is None


def test_interleaved_speedups_are_the_median_ratio_of_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timing rule on a clock the test drives: a variant taking half the reference's time is 2x; a round where
    the host stalled one run (an outlier) does not move the median."""
    from cnn.model import precision

    clock = [0.0]
    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock[0])
    stalls = iter([0.0, 0.0, 5.0])  # the variant's third run is slowed by the host

    def takes(seconds: float, stall: bool = False) -> Callable[[], None]:
        def run() -> None:
            clock[0] += seconds + (next(stalls) if stall else 0.0)

        return run

    speeds = precision.interleaved_speedups(takes(2.0), [takes(1.0, stall=True), takes(4.0)], rounds=3)
    assert speeds == [2.0, 0.5]

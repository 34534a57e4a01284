"""The one precision policy, as training, scoring and the benchmarks see it."""

from __future__ import annotations

import pytest
import torch

from cnn.errors import UserError
from cnn.precision import BF16_MIN_AGREEMENT, choose_inference_precision, training_amp

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
    monkeypatch.setattr("cnn.precision.cpu_bf16_available", lambda: True)
    assert choose_inference_precision("auto", CPU, lambda: agreement).name == expected


def test_auto_without_native_bf16_stays_fp32_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cnn.precision.cpu_bf16_available", lambda: False)
    choice = choose_inference_precision("auto", CPU, _never)
    assert choice.name == "fp32" and "no native bf16" in choice.reason


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="auto, fp32, bf16"):
        choose_inference_precision("fp8", CPU, _never)


def test_cpu_training_is_fp32_and_needs_no_scaler() -> None:
    dtype, scaler = training_amp(CPU, enabled=True)
    assert dtype is None and not scaler.is_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_policy() -> None:
    cuda = torch.device("cuda")
    assert choose_inference_precision("fp32", cuda, _never).autocast_dtype is None
    assert choose_inference_precision("auto", cuda, _never).name in ("bf16", "fp16")
    dtype, scaler = training_amp(cuda, enabled=True)
    assert dtype in (torch.bfloat16, torch.float16) and scaler.is_enabled() == (dtype == torch.float16)

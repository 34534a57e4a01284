"""The one precision policy: which autocast dtype runs where, and when bf16 may replace fp32.

Training, scoring, the MLflow model and the benchmarks all ask here, so the rule exists once:
- training on CUDA with `amp`: bf16 where the GPU supports it, else fp16 with a grad scaler; on CPU `auto` trains
  under bf16 autocast only on CPUs with native bf16 and only where a few timed steps of the run's own model ran at
  least `BF16_MIN_SPEEDUP` times as fast as fp32 (`bf16` forces it, `fp32` keeps full precision);
- inference on CUDA: autocast (bf16, else fp16) unless fp32 is forced;
- inference on CPU: `auto` uses bf16 only on CPUs with native bf16, only when its top-1 labels agree with fp32 on
  at least `BF16_MIN_AGREEMENT` of the model's validation images, and only when it runs at least
  `BF16_MIN_SPEEDUP` times as fast as fp32 on this host (on CPUs with AVX512-BF16 but no AMX it can be slower);
  `bf16` forces it and reports the measured agreement; `fp32` forces full precision.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cnn.choices import PRECISIONS
from cnn.errors import UserError

BF16_MIN_AGREEMENT = 0.995
BF16_MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by a margin the host's noise cannot fake
_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses, why, and (on CPU) the measured bf16 agreement with fp32."""

    name: Literal["fp32", "bf16", "fp16"]
    reason: str
    agreement: float | None = None
    speedup: float | None = None  # bf16's images/s over fp32's on this host, where measured

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype; None runs in full precision."""
        return _DTYPES[self.name]

    def describe(self) -> str:
        measured = "" if self.agreement is None else f", bf16 top-1 agreement {self.agreement:.4f}"
        if self.speedup is not None:
            measured += f", bf16 at {self.speedup:.2f}x fp32's speed on {host_type()}"
        return f"{self.name} ({self.reason}{measured})"


def cpu_bf16_available() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX)."""
    return _bf16_units() != "nobf16"


def _bf16_units() -> str:
    """This CPU's bf16 units: amx, avx512bf16 or nobf16."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512bf16"
    return "nobf16"


def host_type() -> str:
    """What decides CPU inference speed here, as a key: the architecture, the bf16 units and the torch threads
    (`x86_64-amx-2t`). A speed measured on one host holds for hosts of the same type."""
    return f"{platform.machine() or 'cpu'}-{_bf16_units()}-{torch.get_num_threads()}t"


def cuda_autocast_dtype() -> torch.dtype:
    """bf16 on GPUs that support it, else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_inference_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast on CUDA, full precision elsewhere: what a predictor starts with before a choice is made."""
    return cuda_autocast_dtype() if device.type == "cuda" else None


def training_amp(device: torch.device, choice: PrecisionChoice) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """Autocast dtype and grad scaler for training under the policy's choice (only fp16 needs the scaler)."""
    dtype = choice.autocast_dtype
    return dtype, torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)


def choose_training_precision(
    requested: str, device: torch.device, amp: bool, speedup: Callable[[], float | None]
) -> PrecisionChoice:
    """Apply the policy to training. `speedup` times bf16 training steps against fp32 on this host (called only on
    CPUs with native bf16 under `auto`)."""
    if requested not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if device.type == "cuda":
        if not amp or requested == "fp32":
            return PrecisionChoice("fp32", "amp off" if not amp else "forced")
        return PrecisionChoice("bf16" if cuda_autocast_dtype() == torch.bfloat16 else "fp16", "CUDA amp")
    if requested in ("fp32", "bf16"):
        return PrecisionChoice(requested, "forced")  # type: ignore[arg-type]  # one of the two names
    if device.type != "cpu" or not cpu_bf16_available():
        return PrecisionChoice("fp32", "this CPU has no native bf16")
    faster = speedup()
    if faster is None or faster < BF16_MIN_SPEEDUP:
        return PrecisionChoice("fp32", f"bf16 training is not {BF16_MIN_SPEEDUP:.1f}x faster here", None, faster)
    return PrecisionChoice("bf16", "bf16 training is faster here", None, faster)


def choose_inference_precision(
    requested: str,
    device: torch.device,
    agreement: Callable[[], float | None],
    speedup: Callable[[], float | None] = lambda: None,
) -> PrecisionChoice:
    """Apply the policy. `agreement` measures (or recalls) bf16's top-1 agreement with fp32, `speedup` bf16's
    speed over fp32's on this host; each is called only when the answer depends on it, and returns None when
    there are no images to measure on (then `auto` stays fp32: never slower than fp32 unmeasured)."""
    if requested not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "fp32":
        return PrecisionChoice("fp32", "forced")
    if device.type == "cuda":
        if requested == "bf16":
            if not torch.cuda.is_bf16_supported():
                raise UserError("--precision bf16: this GPU does not support bf16; use auto (fp16) or fp32")
            return PrecisionChoice("bf16", "forced, CUDA autocast")
        return PrecisionChoice("bf16" if cuda_autocast_dtype() == torch.bfloat16 else "fp16", "CUDA autocast")
    if requested == "auto" and not cpu_bf16_available():
        return PrecisionChoice("fp32", "this CPU has no native bf16")
    measured = agreement()
    if requested == "bf16":
        return PrecisionChoice("bf16", "forced", measured)
    if measured is None:
        return PrecisionChoice("fp32", "no validation images to check bf16 on")
    if measured < BF16_MIN_AGREEMENT:
        return PrecisionChoice(
            "fp32", f"bf16 agrees with fp32 on < {BF16_MIN_AGREEMENT:.1%} of validation images", measured
        )
    faster = speedup()
    if faster is None:
        return PrecisionChoice("fp32", "bf16's speed on this host not measured", measured)
    if faster < BF16_MIN_SPEEDUP:
        return PrecisionChoice("fp32", f"bf16 is not {BF16_MIN_SPEEDUP:.1f}x faster here", measured, faster)
    return PrecisionChoice(
        "bf16", f"agrees with fp32 on >= {BF16_MIN_AGREEMENT:.1%} of validation images and is faster", measured, faster
    )


def interleaved_speedups(
    reference: Callable[[], object], variants: Sequence[Callable[[], object]], rounds: int = 3
) -> list[float]:
    """Each variant's speed over `reference`'s (the reference's seconds over the variant's): the median of `rounds`
    rounds that time every one in turn, so that a drift of the host's speed hits all alike. Warm them up first."""
    everyone = [reference, *variants]
    ratios: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        times = []
        for run in everyone:
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        for i, spent in enumerate(times[1:]):
            ratios[i].append(times[0] / max(spent, 1e-9))
    return [float(np.median(r)) for r in ratios]


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of rows whose argmax is the same in two probability arrays (0.0 for none)."""
    if len(reference) == 0:
        return 0.0
    return float((reference.argmax(axis=1) == other.argmax(axis=1)).mean())

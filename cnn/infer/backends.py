"""Inference backends behind one option: torch (eager, the fp32 reference) and the model's ONNX export run by ONNX
Runtime or OpenVINO, in fp32, in bf16 (OpenVINO, on CPUs with native bf16) or in int8.

- The ONNX file is exported once per model with torch's own exporter (`torch.onnx.export`, the torch.export-based
  one): two outputs, the logits and the classifier layer's input (the embedding that similar-case search uses), and
  a free batch dimension. Both runtimes fold batch norm and pick their kernels themselves.
- int8 is post-training static quantization with ONNX Runtime's own tooling (QDQ format, per-channel weights,
  calibrated on the validation split). Both runtimes execute a QDQ model with their int8 kernels (VNNI, AMX).
- The policy (`choose_backend`) accepts a candidate only when its top-1 labels agree with torch fp32's on at least
  `BF16_MIN_AGREEMENT` of the validation images, and picks it only when it is at least `BF16_MIN_SPEEDUP` times as
  fast as torch fp32 on this host and faster than every other accepted candidate: never slower than fp32 eager.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnn.errors import UserError
from cnn.fsio import atomic_path
from cnn.infer.predictor import Predictor
from cnn.model.contract import ModelContract, to_model_input
from cnn.model.networks import classifier_layer
from cnn.model.precision import BF16_MIN_AGREEMENT, BF16_MIN_SPEEDUP, PrecisionChoice, cpu_bf16_available

_log = logging.getLogger(__name__)


INT8_FILE = "model.int8.onnx"
RUNTIMES = ("onnxruntime", "openvino")
_CALIBRATION_IMAGES = 256  # enough for min/max ranges on every layer; more only costs time


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: a backend and the numeric format it runs in."""

    backend: str  # torch | onnxruntime | openvino
    precision: str  # fp32 | bf16 | fp16 | int8

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}"


@dataclass(frozen=True)
class BackendChoice:
    """The backend and precision a run uses, why, and the chosen candidate's measurements."""

    backend: str
    precision: str
    reason: str
    agreement: float | None = None  # top-1 agreement with torch fp32 on the validation split
    speedup: float | None = None  # images/s over torch fp32's on this host
    torch_choice: PrecisionChoice | None = None  # the precision policy's choice, where torch runs

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.backend, self.precision)

    def describe(self) -> str:
        if self.torch_choice is not None:
            return f"{self.torch_choice.describe()}; torch: {self.reason}"
        measured = "" if self.agreement is None else f", top-1 agreement with fp32 {self.agreement:.4f}"
        if self.speedup is not None:
            measured += f", {self.speedup:.2f}x torch fp32's speed here"
        return f"{self.precision} on {self.backend} ({self.reason}{measured})"


def onnx_candidates(backend: str, precision: str) -> list[Candidate]:
    """The ONNX candidates a request admits: `backend` auto (both runtimes) or one runtime; `precision` auto (fp32,
    bf16 where the CPU has native bf16, int8), fp32 or bf16 (OpenVINO only)."""
    runtimes = RUNTIMES if backend == "auto" else (backend,) if backend in RUNTIMES else ()
    formats = {"auto": ("fp32", "bf16", "int8"), "fp32": ("fp32",), "bf16": ("bf16",)}[precision]
    found = [Candidate(r, p) for r in runtimes for p in formats if p != "bf16" or r == "openvino"]
    return [c for c in found if c.precision != "bf16" or cpu_bf16_available()]


def choose_backend(
    requested: str,
    device: torch.device,
    torch_choice: Callable[[], PrecisionChoice],
    candidates: Sequence[Candidate],
    agreement: Callable[[Candidate], float | None],
    speedups: Callable[[Sequence[Candidate]], dict[str, float]],
    forced_precision: bool = False,
) -> BackendChoice:
    """Apply the policy. `torch_choice` is the precision policy's choice for torch; `agreement` measures (or recalls)
    a candidate's top-1 agreement with torch fp32 (None: no validation images); `speedups` the speed over torch
    fp32 of the candidates that passed, by key. A forced runtime skips the agreement gate only for a forced
    precision, as `--precision bf16` does for torch."""
    if requested == "torch" or device.type != "cpu":
        why = "requested" if requested == "torch" else f"ONNX runtimes run on the CPU here, not {device.type}"
        return _torch(torch_choice(), why)
    if requested not in ("auto", *RUNTIMES):
        raise UserError(f"backend must be one of auto, torch, {', '.join(RUNTIMES)}, not {requested!r}")
    if requested != "auto" and not candidates:
        raise UserError(f"--backend {requested} cannot run this precision; use --precision auto or fp32")
    if requested != "auto" and forced_precision:
        only = candidates[0]
        return BackendChoice(only.backend, only.precision, "forced", agreement(only))
    measured = {c.key: agreement(c) for c in candidates}
    passed = [c for c in candidates if (measured[c.key] or 0.0) >= BF16_MIN_AGREEMENT]
    speeds = speedups(passed) if passed else {}
    if requested == "auto":
        base = torch_choice()
        if not passed and any(v is None for v in measured.values()):
            return _torch(base, "no validation images to check the ONNX runtimes on")
        best = _torch(base, "the fastest here that agrees with fp32")
        best_speed = base.speedup if base.name == "bf16" and base.speedup else 1.0
    else:  # a runtime was asked for: its fp32 is the fallback, whatever it measured
        best = BackendChoice(requested, "fp32", "requested", measured.get(f"{requested}-fp32"), None)
        best_speed = speeds.get(f"{requested}-fp32", 0.0)
    for c in passed:
        speed = speeds.get(c.key)
        if speed is not None and speed >= BF16_MIN_SPEEDUP and speed > best_speed:
            best = BackendChoice(c.backend, c.precision, _why(requested), measured[c.key], speed)
            best_speed = speed
    return best


def _why(requested: str) -> str:
    chosen = "the fastest here" if requested == "auto" else f"the fastest {requested} format here"
    return f"{chosen} that agrees with fp32 on >= {BF16_MIN_AGREEMENT:.1%} of validation images"


def _torch(choice: PrecisionChoice, why: str) -> BackendChoice:
    return BackendChoice("torch", choice.name, why, choice.agreement, choice.speedup, choice)


class _WithEmbedding(torch.nn.Module):
    """The classifier with a second output: its classifier layer's input (the embedding), for export."""

    def __init__(self, model: torch.nn.Module, contract: ModelContract) -> None:
        super().__init__()
        self.model = model
        self._captured: list[torch.Tensor] = []
        classifier_layer(contract.model, model).register_forward_pre_hook(
            lambda _m, inputs: self._captured.append(inputs[0])
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        logits = self.model(x)
        return logits, self._captured[-1].flatten(1)


def export_onnx(weights: str | Path, contract: str | Path | ModelContract, target: str | Path) -> Path:
    """Export the model (fp32, eval mode) to ONNX at `target`, written atomically: input `image` (normalised float
    NCHW, any batch size), outputs `logits` and `embedding`."""
    predictor = Predictor.load(weights, contract)
    spec = predictor.contract
    wrapper = _WithEmbedding(predictor.model, spec).eval()
    example = torch.zeros(2, spec.channels, spec.image_size, spec.image_size)
    with atomic_path(target) as partial, _quiet_exporter():
        torch.onnx.export(
            wrapper,
            (example,),
            str(partial),
            input_names=["image"],
            output_names=["logits", "embedding"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        _without_host_paths(partial)
    return Path(target)


def _without_host_paths(path: Path) -> None:
    """Drop the exporter's per-node metadata (the Python stack that built each node, with this host's absolute
    paths): the export is registered and shared, and nothing reads it back."""
    # imported here: heavy (onnx): only where a model is exported
    import onnx

    model = onnx.load(str(path))
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
    onnx.save(model, str(path))


class _quiet_exporter:
    """The exporter prints its progress and warnings to the console; a scoring run's log keeps only ours."""

    def __enter__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "onnxscript"):
            logger = logging.getLogger(name)
            self._stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def quantize_int8(onnx_file: str | Path, images: np.ndarray, contract: ModelContract, target: str | Path) -> Path:
    """Static int8 quantization of the ONNX model with ONNX Runtime's tooling (QDQ, per-channel weights), its
    activation ranges calibrated on up to 256 of `images` (uint8 NHWC, decoded with the contract's spec)."""
    # imported here: optional heavy backend: only when ONNX Runtime runs the model
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not len(images):
        raise UserError("int8 needs validation images to calibrate on, and the version's dataset has none")

    class _Batches(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            self._batches = _normalised_batches(images[:_CALIBRATION_IMAGES], contract, 32)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process goes to the root logger; shapes are static here
    try:
        with atomic_path(target) as partial:
            quantize_static(
                str(onnx_file),
                str(partial),
                _Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
    finally:
        root.setLevel(level)
    return Path(target)


def _normalised_batches(
    images: np.ndarray, contract: ModelContract, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    mean, std = torch.tensor(contract.mean), torch.tensor(contract.std)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        yield {"image": to_model_input(batch, mean, std, torch.device("cpu"), False).numpy()}


class OnnxEngine:
    """An ONNX model compiled by one runtime: normalised float NCHW in, (logits, embeddings) out."""

    def __init__(self, onnx_file: str | Path, backend: str, precision: str) -> None:
        self.backend, self.precision = backend, precision
        threads = torch.get_num_threads()  # the same threads torch would use, so speeds compare fairly
        if backend == "onnxruntime":
            self._run = _onnxruntime_session(Path(onnx_file), threads)
        elif backend == "openvino":
            self._run = _openvino_model(Path(onnx_file), "bf16" if precision == "bf16" else "f32", threads)
        else:
            raise UserError(f"unknown ONNX backend {backend!r}: use one of {', '.join(RUNTIMES)}")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._run(x)


def _onnxruntime_session(path: Path, threads: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    # imported here: optional heavy backend: only when ONNX Runtime runs the model
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = session.run(["logits", "embedding"], {"image": x})
        return logits, embedding

    return run


def _openvino_model(path: Path, hint: str, threads: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    # imported here: optional heavy backend: only when OpenVINO runs the model
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)  # read_model: no telemetry, no network
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = request.infer({"image": x})  # its outputs live in the request's buffers: copy before the next call
        return np.array(result["logits"]), np.array(result["embedding"])

    return run

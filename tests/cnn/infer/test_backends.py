"""Inference backends: the ONNX export run by ONNX Runtime and OpenVINO predicts what torch predicts, int8 is
calibrated on real images, and the policy picks the fastest candidate that agrees with fp32, never a slower one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cnn.data.dataset import Dataset
from cnn.errors import UserError
from cnn.infer.backends import (
    BackendChoice,
    Candidate,
    OnnxEngine,
    choose_backend,
    export_onnx,
    onnx_candidates,
    quantize_int8,
)
from cnn.infer.predictor import Predictor, relative_speeds
from cnn.model.precision import PrecisionChoice, cpu_bf16_available, top1_agreement
from cnn.model.run import FitResult
from cnn.trust.evaluation import split_images

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported(trained: FitResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(trained.weights, trained.contract, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_export_has_a_free_batch_and_both_outputs(exported: Path) -> None:
    graph = onnx.load(str(exported)).graph
    assert [o.name for o in graph.output] == ["logits", "embedding"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # any batch size, not the example's 2
    assert not list(exported.parent.glob("*.tmp*"))  # written atomically


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_runtimes_predict_what_torch_predicts(
    backend: str, trained: FitResult, patterns: Path, exported: Path
) -> None:
    torch_predictor = Predictor.load(trained.weights, trained.contract)
    images = split_images(Dataset(patterns), "test", torch_predictor.contract)[0]
    other = torch_predictor.with_engine(OnnxEngine(exported, backend, "fp32"))
    probs, vectors = other.predict_with_embeddings(images, batch_size=7)  # a last batch smaller than the others
    want_probs, want_vectors = torch_predictor.predict_with_embeddings(images, batch_size=16)
    np.testing.assert_allclose(probs, want_probs, atol=1e-4)
    np.testing.assert_allclose(vectors, want_vectors, rtol=1e-3, atol=1e-3)
    assert (probs.argmax(1) == want_probs.argmax(1)).all()


def test_int8_is_calibrated_on_the_images_and_agrees(
    trained: FitResult, patterns: Path, exported: Path, tmp_path: Path
) -> None:
    predictor = Predictor.load(trained.weights, trained.contract)
    val = split_images(Dataset(patterns), "val", predictor.contract)[0]
    quantized = quantize_int8(exported, val, predictor.contract, tmp_path / "model.int8.onnx")
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: both runtimes run it with int8 kernels
    test = split_images(Dataset(patterns), "test", predictor.contract)[0]
    reference = predictor.predict_arrays(test)
    for backend in ("onnxruntime", "openvino"):
        int8 = predictor.with_engine(OnnxEngine(quantized, backend, "int8")).predict_arrays(test)
        assert top1_agreement(reference, int8) >= 0.9
        assert np.abs(int8 - reference).max() > 0  # really another computation, not the fp32 model again
    with pytest.raises(UserError, match="needs validation images"):
        quantize_int8(exported, val[:0], predictor.contract, tmp_path / "none.onnx")


def test_relative_speeds_times_every_variant_against_the_reference(trained: FitResult, patterns: Path) -> None:
    predictor = Predictor.load(trained.weights, trained.contract)
    images = split_images(Dataset(patterns), "val", predictor.contract)[0]
    speeds = relative_speeds(predictor, [predictor, predictor.with_precision(torch.bfloat16)], images, 8, rounds=3)
    assert len(speeds) == 2 and all(s > 0 for s in speeds)
    assert relative_speeds(predictor, [predictor], images[:0]) == []


def test_candidates_follow_the_request() -> None:
    keys = [c.key for c in onnx_candidates("auto", "auto")]
    bf16 = ["openvino-bf16"] if cpu_bf16_available() else []
    assert keys == ["onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", *bf16, "openvino-int8"]
    assert [c.key for c in onnx_candidates("onnxruntime", "fp32")] == ["onnxruntime-fp32"]
    assert onnx_candidates("onnxruntime", "bf16") == []  # ONNX Runtime's CPU kernels have no bf16 convolutions
    assert onnx_candidates("torch", "auto") == []


def _choose(
    requested: str,
    agreements: dict[str, float | None],
    speeds: dict[str, float],
    torch_choice: PrecisionChoice | None = None,
    forced: bool = False,
) -> tuple[BackendChoice, list[str]]:
    timed: list[str] = []

    def speedups(passed: Sequence[Candidate]) -> dict[str, float]:
        timed.extend(c.key for c in passed)
        return {c.key: speeds[c.key] for c in passed if c.key in speeds}

    candidates = [Candidate(*key.split("-")) for key in agreements]
    choice = choose_backend(
        requested,
        CPU,
        lambda: torch_choice or PrecisionChoice("fp32", "bf16 is not 1.1x faster here"),
        candidates,
        lambda c: agreements[c.key],
        speedups,
        forced_precision=forced,
    )
    return choice, timed


def test_auto_picks_the_fastest_candidate_that_agrees() -> None:
    agreements = {"onnxruntime-fp32": 1.0, "onnxruntime-int8": 0.999, "openvino-int8": 0.98}
    speeds = {"onnxruntime-fp32": 1.15, "onnxruntime-int8": 3.8, "openvino-int8": 4.4}
    choice, timed = _choose("auto", agreements, speeds)
    assert (choice.backend, choice.precision, choice.speedup) == ("onnxruntime", "int8", 3.8)
    assert timed == ["onnxruntime-fp32", "onnxruntime-int8"]  # openvino-int8 disagreed: never even timed
    assert "int8 on onnxruntime (the fastest here that agrees" in choice.describe()


def test_auto_keeps_torch_unless_a_candidate_is_clearly_faster() -> None:
    choice, _ = _choose("auto", {"onnxruntime-fp32": 1.0, "openvino-fp32": 1.0}, {"onnxruntime-fp32": 1.05})
    assert choice.backend == "torch" and choice.precision == "fp32"
    assert choice.describe().startswith("fp32 (bf16 is not 1.1x faster here); torch: the fastest here")
    fast_bf16 = PrecisionChoice("bf16", "agrees and is faster", 0.999, 2.5)  # torch bf16 already 2.5x
    choice, _ = _choose("auto", {"openvino-fp32": 1.0}, {"openvino-fp32": 1.9}, fast_bf16)
    assert (choice.backend, choice.precision) == ("torch", "bf16")


def test_auto_without_validation_images_stays_on_torch() -> None:
    choice, timed = _choose("auto", {"onnxruntime-fp32": None}, {})
    assert choice.backend == "torch" and "no validation images" in choice.reason and timed == []


def test_a_requested_runtime_falls_back_to_its_fp32() -> None:
    choice, _ = _choose("openvino", {"openvino-fp32": 1.0, "openvino-int8": 0.97}, {"openvino-fp32": 0.9})
    assert (choice.backend, choice.precision) == ("openvino", "fp32")
    choice, _ = _choose(
        "openvino", {"openvino-fp32": 1.0, "openvino-int8": 0.999}, {"openvino-fp32": 0.9, "openvino-int8": 3.0}
    )
    assert (choice.backend, choice.precision) == ("openvino", "int8")


def test_forced_precision_on_a_requested_runtime_skips_the_gate() -> None:
    choice, timed = _choose("openvino", {"openvino-bf16": 0.9}, {}, forced=True)
    assert (choice.backend, choice.precision, choice.agreement) == ("openvino", "bf16", 0.9) and timed == []
    assert "forced" in choice.describe()
    with pytest.raises(UserError, match="cannot run this precision"):
        _choose("onnxruntime", {}, {})
    with pytest.raises(UserError, match="backend must be one of"):
        _choose("tensorrt", {}, {})


def test_torch_and_cuda_never_consult_the_runtimes() -> None:
    def unused(*_: object) -> dict[str, float]:
        raise AssertionError("measured a candidate that cannot be chosen")

    choice = choose_backend("torch", CPU, lambda: PrecisionChoice("fp32", "forced"), [], unused, unused)
    assert choice.backend == "torch" and choice.describe() == "fp32 (forced); torch: requested"
    cuda = choose_backend(
        "auto", torch.device("cuda"), lambda: PrecisionChoice("bf16", "CUDA autocast"), [], unused, unused
    )
    assert cuda.backend == "torch" and "not cuda" in cuda.reason

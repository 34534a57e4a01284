"""Batch prediction from files: the ingest decoder, the model's own contract, batched `inference_mode`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnn.infer.predictions import prediction_columns, prob_columns
from cnn.io.decode import DecodeError, decode_bytes, read_image_bytes
from cnn.model.contract import ModelContract, to_model_input
from cnn.model.networks import classifier_layer, create_model
from cnn.model.precision import default_inference_dtype, interleaved_speedups, top1_agreement
from cnn.model.runtime import load_weights, resolve_device

_log = logging.getLogger(__name__)


@dataclass
class Predictor:
    """A trained model plus its contract; predicts labels and probabilities for image files or bytes."""

    model: torch.nn.Module
    contract: ModelContract
    device: torch.device
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast; None = full precision
    compile: bool = False  # torch.compile (inductor, weights frozen); eager again if compiling fails
    # another runtime running the model's export (cnn.infer.backends.OnnxEngine): normalised NCHW -> (logits, vectors)
    engine: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    _compiled: torch.nn.Module | None = field(default=None, init=False, repr=False)
    _compile_failed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def load(
        cls,
        weights: str | Path,
        contract: str | Path | ModelContract,
        device: str = "cpu",
        channels_last: bool = False,
        fuse: bool = False,
    ) -> Predictor:
        """Rebuild the network from the contract and load a state_dict (weights_only: no pickled objects).

        It starts with the precision policy's default (autocast on CUDA, fp32 elsewhere; see `with_precision`).
        `fuse` folds batch norm into the preceding convolutions (same outputs up to rounding, fewer passes over
        memory)."""
        contract = contract if isinstance(contract, ModelContract) else ModelContract.load(contract)
        model = create_model(contract.model, len(contract.classes), contract.channels, None, **contract.model_options)
        load_weights(model, weights)
        model.eval()
        if fuse:
            model = _fuse_conv_bn(model)
        torch_device = resolve_device(device)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(torch_device).to(memory_format=memory)
        return cls(model, contract, torch_device, channels_last, default_inference_dtype(torch_device))

    def with_precision(self, dtype: torch.dtype | None) -> Predictor:
        """The same model under another autocast dtype (shares the weights)."""
        return replace(self, autocast_dtype=dtype)

    def with_engine(self, engine: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None) -> Predictor:
        """The same model run by another runtime (see cnn.infer.backends); None runs it in torch again."""
        return replace(self, engine=engine)

    def compiled(self) -> Predictor:
        """The same model under torch.compile. Batches are padded to one shape so it compiles once (seconds to a
        minute, paid back on large batches); where compiling fails (no C++ compiler, say) it predicts eagerly."""
        return replace(self, compile=True)

    @property
    def compile_failed(self) -> bool:
        """True once compiling failed and prediction went on eagerly."""
        return self._compile_failed

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor
        if self.compile and not self._compile_failed:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(  # type: ignore[assignment]  # a callable wrapping the module
                        self.model, dynamic=False, options={"freezing": True}
                    )
                out = self._compiled(x)  # type: ignore[misc]  # set just above
                return out
            except Exception as exc:  # noqa: BLE001 - compiler and backend errors vary; eager always works
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                _log.warning("torch.compile failed (%s: %s); predicting without it", type(exc).__name__, first)
                self._compile_failed = True
        out = self.model(x)
        return out

    @property
    def prob_columns(self) -> list[str]:
        return prob_columns(self.contract.classes)

    def uncalibrated(self) -> Predictor:
        """The same model with temperature 1 (the raw softmax), as calibration fits it."""
        return replace(self, contract=replace(self.contract, temperature=1.0))

    def predict_arrays(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities (N, C) for uint8 NHWC arrays already decoded with the contract's spec:
        softmax(logits / T) with the contract's temperature."""
        return self._run(images, batch_size, embed=False)[0]

    def predict_with_embeddings(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, C), embeddings (N, D) float32) in the same forward pass: the embedding is the input of
        the classifier layer (the last hidden layer, a description of the image), captured by a hook that
        torch.compile traces too (where a compiled graph skips it, that batch runs again eagerly)."""
        probs, embeddings = self._run(images, batch_size, embed=True)
        assert embeddings is not None  # embed=True always fills it
        return probs, embeddings

    def _run(self, images: np.ndarray, batch_size: int, embed: bool) -> tuple[np.ndarray, np.ndarray | None]:
        temperature = float(self.contract.temperature or 1.0)
        mean = torch.tensor(self.contract.mean, device=self.device)
        std = torch.tensor(self.contract.std, device=self.device)
        out, vectors = [], []
        captured: list[torch.Tensor] = []
        hook = (
            classifier_layer(self.contract.model, self.model).register_forward_pre_hook(
                lambda _m, inputs: captured.append(inputs[0].detach())
            )
            if embed and self.engine is None
            else None
        )
        try:
            with torch.inference_mode():
                for start in range(0, len(images), batch_size):
                    batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
                    logits, vector = self._batch(batch, batch_size, mean, std, captured if embed else None)
                    out.append(torch.softmax(logits.float() / temperature, dim=1).cpu().numpy())
                    if vector is not None:
                        vectors.append(vector)
        finally:
            if hook is not None:
                hook.remove()
        probs = np.concatenate(out) if out else np.zeros((0, len(self.contract.classes)), dtype=np.float32)
        if not embed:
            return probs, None
        return probs, np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    def _batch(
        self,
        batch: torch.Tensor,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        captured: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits of one uint8 NHWC batch, and its embeddings where `captured` collects them."""
        n = len(batch)
        if self.engine is not None:
            logits, vectors = self.engine(to_model_input(batch, mean, std, self.device, False).numpy())
            return torch.from_numpy(logits), None if captured is None else vectors.astype(np.float32, copy=False)
        if self.compile and n < batch_size:  # one input shape, one compilation
            batch = torch.cat([batch, batch[:1].expand(batch_size - n, *batch.shape[1:])])
        x = to_model_input(batch, mean, std, self.device, self.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self._forward(x)[:n]
            if captured is not None and not captured:  # a graph compiled before the hook existed
                self.model(x)
        if captured is None:
            return out, None
        vectors = captured[-1][:n].flatten(1).float().cpu().numpy()
        captured.clear()
        return out, vectors

    def predict_mirrored(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities of the horizontally mirrored images (the test-time flip)."""
        return self.predict_arrays(np.ascontiguousarray(images[:, :, ::-1]), batch_size)

    def predict_files(self, sources: Sequence[str | os.PathLike[str] | bytes], batch_size: int = 64) -> pd.DataFrame:
        """One row per input: label, confidence, decision, prob_<class>..., error (None when scored)."""
        spec = self.contract.decode_spec()
        decoded: list[np.ndarray] = []
        positions: list[int] = []
        errors: list[str | None] = [None] * len(sources)
        for i, source in enumerate(sources):
            try:
                data = source if isinstance(source, bytes) else read_image_bytes(source, spec)
                decoded.append(decode_bytes(data, spec).array)
                positions.append(i)
            except DecodeError as exc:
                errors[i] = exc.reason
        probs = np.full((len(sources), len(self.contract.classes)), np.nan)
        if decoded:
            probs[positions] = self.predict_arrays(np.stack(decoded), batch_size)
        frame = prediction_columns(probs, self.contract.classes, points=self.contract.points())
        frame["error"] = pd.Series(errors, dtype=object)
        return frame


def bf16_speedup(predictor: Predictor, images: np.ndarray, batch_size: int = 64, rounds: int = 3) -> float | None:
    """bf16 autocast's images/s over fp32's on this host (`relative_speeds`); None without images."""
    fp32 = predictor.with_precision(None)
    speeds = relative_speeds(fp32, [fp32.with_precision(torch.bfloat16)], images, batch_size, rounds)
    return speeds[0] if speeds else None


def relative_speeds(
    reference: Predictor, variants: Sequence[Predictor], images: np.ndarray, batch_size: int = 64, rounds: int = 3
) -> list[float]:
    """Each variant's images/s over `reference`'s on this host: the median of `rounds` interleaved timings on up to
    256 of `images`, after a warm-up batch of each (empty without images)."""
    images = images[:256]
    if not len(images):
        return []
    for variant in (reference, *variants):  # warm-up: first-call allocations and kernel selection
        variant.predict_arrays(images[:batch_size], batch_size)

    def timed(variant: Predictor) -> Callable[[], object]:
        return lambda: variant.predict_arrays(images, batch_size)

    return interleaved_speedups(timed(reference), [timed(v) for v in variants], rounds)


def bf16_agreement(predictor: Predictor, images: np.ndarray, batch_size: int = 128) -> float:
    """Share of images whose top-1 label under bf16 autocast equals fp32's."""
    fp32 = predictor.with_precision(None).predict_arrays(images, batch_size)
    bf16 = predictor.with_precision(torch.bfloat16).predict_arrays(images, batch_size)
    return top1_agreement(fp32, bf16)


def _fuse_conv_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold BatchNorm into convolutions with torch.fx; the unfused model where tracing is not possible."""
    # imported here: torch.fx loads its tracer; only when batch norm is folded
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace simply runs unfused
        return model

"""Temperature scaling (Guo et al., 2017): one scalar T divides the logits so that the softmax confidence
matches the accuracy. Fitted on the validation split by minimising the negative log-likelihood; it never
changes the argmax, so labels, accuracy and rankings stay as they were, only the probabilities move.

The logits are recovered from the predictor's probabilities (log p = logits - logsumexp, and the constant
cancels in the softmax), so any predictor can be calibrated after the fact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from cnn.metrics.classification import expected_calibration_error

_TINY = 1e-30  # float32 probabilities underflow to 0; a floor keeps their logs finite


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature and what it did: ECE and NLL before and after, on validation and test."""

    temperature: float
    applied: bool  # False when it would have made the test split's ECE worse (then T = 1 is kept)
    val_ece_before: float
    val_ece_after: float
    test_ece_before: float | None
    test_ece_after: float | None
    val_nll_before: float
    val_nll_after: float
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The scalar figures, for MLflow."""
        out = {k: float(v) for k, v in asdict(self).items() if isinstance(v, (int, float)) and v is not None}
        out["applied"] = float(self.applied)
        return out


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities (logits up to a per-row constant)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _TINY, 1.0))


def rescale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities as the model with `temperature` gives them (from probabilities at T = 1)."""
    logits = log_probs(probs) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    if not len(labels):
        return 0.0
    return float(-log_probs(probs)[np.arange(len(labels)), labels].mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 that minimises the NLL of `labels` under softmax(logits / T) (L-BFGS on log T)."""
    if len(labels) < 2:
        return 1.0
    logits = torch.from_numpy(log_probs(probs))
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()  # type: ignore[no-untyped-call]  # torch's stubs leave backward untyped
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]  # as above
    temperature = float(log_t.exp().item())
    return temperature if np.isfinite(temperature) and 0.01 < temperature < 100 else 1.0


def calibrate(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> Calibration:
    """Fit T on validation; keep T = 1 where the test split's ECE would get worse (reported in `note`)."""
    temperature = fit_temperature(val_probs, val_labels)
    val_after = rescale(val_probs, temperature)
    has_test = test_probs is not None and test_labels is not None and len(test_labels) > 0
    test_before = expected_calibration_error(test_probs, test_labels) if has_test else None  # type: ignore[arg-type]
    test_after = (
        expected_calibration_error(rescale(test_probs, temperature), test_labels)  # type: ignore[arg-type]
        if has_test
        else None
    )
    applied, note = True, ""
    if test_before is not None and test_after is not None and test_after > test_before:
        applied = False
        note = (
            f"T = {temperature:.3f} fitted on validation would raise the test ECE from {test_before:.4f} to "
            f"{test_after:.4f}; probabilities are left uncalibrated (T = 1)"
        )
    return Calibration(
        temperature=temperature if applied else 1.0,
        applied=applied,
        val_ece_before=expected_calibration_error(val_probs, val_labels) if len(val_labels) else 0.0,
        val_ece_after=expected_calibration_error(val_after, val_labels) if len(val_labels) else 0.0,
        test_ece_before=test_before,
        test_ece_after=test_after if applied else test_before,
        val_nll_before=nll(val_probs, val_labels),
        val_nll_after=nll(val_after, val_labels),
        note=note,
    )

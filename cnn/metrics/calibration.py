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
FOLDS = 5  # the validation split's folds that decide whether T helps (fit on four, judge on the fifth)
MIN_TO_DECIDE = 20  # validation images below which held-out folds are too small to tell: T = 1 is kept


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature and what it did: ECE and NLL before and after, on validation and test."""

    temperature: float
    applied: bool  # False when T did not lower the NLL of held-out validation folds (then T = 1 is kept)
    val_ece_before: float
    val_ece_after: float
    test_ece_before: float | None
    test_ece_after: float | None
    val_nll_before: float
    val_nll_after: float
    note: str = ""
    cv_nll_before: float | None = None  # the validation folds' held-out NLL at T = 1 ...
    cv_nll_after: float | None = None  # ... and at the T fitted on the other folds (what decides `applied`)

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


def cross_validated_nll(
    probs: np.ndarray, labels: np.ndarray, folds: int = FOLDS, seed: int = 0
) -> tuple[float, float]:
    """(NLL at T = 1, NLL at the T fitted on the other folds), each fold of the validation split held out in turn:
    whether temperature scaling helps data it was not fitted on, decided without the test split."""
    order = np.random.default_rng(seed).permutation(len(labels))
    before = after = 0.0
    for held in np.array_split(order, folds):
        rest = np.setdiff1d(order, held, assume_unique=True)
        temperature = fit_temperature(probs[rest], labels[rest])
        before += nll(probs[held], labels[held]) * len(held)
        after += nll(rescale(probs[held], temperature), labels[held]) * len(held)
    return before / len(labels), after / len(labels)


def calibrate(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> Calibration:
    """Fit T on validation and apply it where it lowers the NLL of held-out validation folds (`cross_validated_nll`);
    the test split decides nothing: its ECE is reported before and after, whichever way it went."""
    val_probs, val_labels = np.asarray(val_probs), np.asarray(val_labels)
    temperature = fit_temperature(val_probs, val_labels)
    val_after = rescale(val_probs, temperature)
    cv_before = cv_after = None
    if len(val_labels) < MIN_TO_DECIDE:
        applied = False
        note = f"{len(val_labels)} validation images are too few to tell whether T = {temperature:.3f} helps (T = 1)"
    else:
        cv_before, cv_after = cross_validated_nll(val_probs, val_labels)
        applied = cv_after < cv_before
        note = (
            ""
            if applied
            else (
                f"T = {temperature:.3f} did not lower the NLL of held-out validation folds ({cv_before:.4f} -> "
                f"{cv_after:.4f}): T = 1 kept"
            )
        )
    chosen = temperature if applied else 1.0
    test_before = test_after = None
    if test_probs is not None and test_labels is not None and len(test_labels):
        test_before = expected_calibration_error(test_probs, test_labels)
        test_after = expected_calibration_error(rescale(test_probs, chosen), test_labels)
        if test_after > test_before:  # reported, never acted on: the test split only reports
            note = (note + " " if note else "") + f"On test the ECE rose from {test_before:.4f} to {test_after:.4f}."
    return Calibration(
        temperature=chosen,
        applied=applied,
        val_ece_before=expected_calibration_error(val_probs, val_labels) if len(val_labels) else 0.0,
        val_ece_after=expected_calibration_error(val_after, val_labels) if len(val_labels) else 0.0,
        test_ece_before=test_before,
        test_ece_after=test_after,
        val_nll_before=nll(val_probs, val_labels),
        val_nll_after=nll(val_after, val_labels),
        note=note,
        cv_nll_before=cv_before,
        cv_nll_after=cv_after,
    )

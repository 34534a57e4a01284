"""Does tonight's batch still look like the data the model was validated on?

The reference is the version's validation split (held-out images of the training distribution, scored by the model
itself): its predicted-class mix, confidences, image statistics (brightness, contrast, source size, format) and a
sample of embeddings. A batch is compared statistic by statistic:

- categorical (predicted-class mix, format mix): chi-square test against the reference proportions;
- continuous (confidence, brightness, contrast, source size): two-sample Kolmogorov-Smirnov test;
- embeddings: maximum mean discrepancy (RBF kernel, median-distance bandwidth) with a permutation p-value.

Each also gets an effect size (population stability index, PSI, for the first two kinds). A statistic drifts when
its p-value is below `alpha` divided by the number of statistics (Bonferroni: about `alpha` false alarms per run
on batches of the training distribution) **and** its effect is large enough to matter (PSI >= `min_psi`; for the
embeddings, MMD >= `min_mmd`): a million-image batch makes any difference significant, and a small one makes
no difference significant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnn.formats import migrated

CONTINUOUS = ("confidence", "brightness", "contrast", "long_side")
CATEGORICAL = ("predicted_class", "format")
DRIFT_FORMAT = 1  # drift.json's format (cnn.formats)
EMBEDDING_SAMPLE = 300  # per side of the MMD test
PERMUTATIONS = 200


@dataclass
class DriftSample:
    """What a batch (or a shard of one) contributes to the drift check: per-image statistics and a sample of
    embeddings. Small, so that shards can return it."""

    predicted_class: list[str] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    brightness: list[float] = field(default_factory=list)
    contrast: list[float] = field(default_factory=list)
    long_side: list[float] = field(default_factory=list)
    format: list[str] = field(default_factory=list)
    embeddings: list[list[float]] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        labels: Sequence[str],
        confidence: np.ndarray,
        images: np.ndarray,
        sizes: Sequence[tuple[int, int]],
        formats: Sequence[str],
        embeddings: np.ndarray | None,
        keep: int = 64,
        seed: int = 0,
    ) -> DriftSample:
        brightness, contrast = image_stats(images)
        picked: list[list[float]] = []
        if embeddings is not None and len(embeddings):
            rows = np.random.default_rng(seed).permutation(len(embeddings))[:keep]
            picked = np.asarray(embeddings[rows], dtype=np.float16).astype(float).tolist()
        return cls(
            list(labels),
            [float(c) for c in confidence],
            brightness.tolist(),
            contrast.tolist(),
            [float(max(w, h)) for w, h in sizes],
            list(formats),
            picked,
        )

    def merge(self, other: DriftSample) -> DriftSample:
        return DriftSample(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def __len__(self) -> int:
        return len(self.confidence)


def image_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(brightness: mean pixel value, contrast: pixel standard deviation) of each decoded uint8 image."""
    if not len(images):
        return np.zeros(0), np.zeros(0)
    # every 4th pixel of every 4th row: the statistics of a whole batch hardly move, the cost falls 16-fold
    flat = np.asarray(images[:, ::4, ::4], dtype=np.float32).reshape(len(images), -1)
    return flat.mean(axis=1), flat.std(axis=1)


@dataclass(frozen=True)
class DriftReference:
    """A version's reference for the drift check (its `drift.json`): the held-out split's per-image statistics
    (sub-sampled), how many images they came from, and which split."""

    predicted_class: list[str]
    format: list[str]
    confidence: list[float]
    brightness: list[float]
    contrast: list[float]
    long_side: list[float]
    images: int
    split: str = "val"
    format_version: int = DRIFT_FORMAT

    def values(self, name: str) -> list[Any]:
        """One statistic's reference values (one of CATEGORICAL or CONTINUOUS)."""
        if name not in (*CATEGORICAL, *CONTINUOUS):
            raise KeyError(name)
        found: list[Any] = getattr(self, name)
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftReference:
        """From `to_dict`, or from a drift.json written before it named its format (format 1: the same keys)."""
        return cls(**migrated(data, DRIFT_FORMAT, {}, "the version's drift.json"))


@dataclass(frozen=True)
class Statistic:
    """One statistic's comparison of the batch with the reference."""

    name: str
    test: str
    p_value: float
    effect: float  # PSI, or MMD for the embeddings
    drifted: bool
    detail: str = ""


@dataclass(frozen=True)
class DriftReport:
    """All statistics of one batch; `drifted` when any statistic is."""

    images: int
    statistics: list[Statistic]
    alpha: float

    @property
    def drifted(self) -> bool:
        return any(s.drifted for s in self.statistics)

    def describe(self) -> str:
        flagged = [s for s in self.statistics if s.drifted]
        if not flagged:
            return f"no drift against the validation reference ({self.images} images)"
        return "drift: " + "; ".join(f"{s.name} ({s.detail or s.test}, p = {s.p_value:.2g})" for s in flagged)

    def rows(self) -> list[dict[str, object]]:
        return [asdict(s) for s in self.statistics]


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two distributions over the same bins (proportions)."""
    e, a = np.clip(expected, eps, None), np.clip(actual, eps, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def _categorical(
    name: str, reference: Sequence[str], batch: Sequence[str], threshold: float, min_psi: float
) -> Statistic:
    # imported here: heavy: only where the statistic is computed
    from scipy.stats import chisquare

    categories = sorted(set(reference) | set(batch))
    ref = np.array([sum(1 for r in reference if r == c) for c in categories], dtype=float) + 0.5
    got = np.array([sum(1 for b in batch if b == c) for c in categories], dtype=float)
    expected = ref / ref.sum() * got.sum()
    p = float(chisquare(got, expected).pvalue) if len(categories) > 1 else 1.0
    effect = psi(ref / ref.sum(), got / max(got.sum(), 1))
    shares = ", ".join(
        f"{c} {g / max(got.sum(), 1):.0%} (ref {r / ref.sum():.0%})" for c, g, r in zip(categories, got, ref)
    )
    return Statistic(name, "chi-square", p, effect, p < threshold and effect >= min_psi, shares)


def _continuous(name: str, reference: np.ndarray, batch: np.ndarray, threshold: float, min_psi: float) -> Statistic:
    # imported here: heavy: only where the statistic is computed
    from scipy.stats import ks_2samp

    p = float(ks_2samp(reference, batch).pvalue)
    # deciles of the reference; below the lowest and above the highest are bins of their own, so that a batch
    # outside the reference's range (a reference of one source size, say) shows
    q = np.unique(np.quantile(reference, np.linspace(0, 1, 11)))
    edges = np.concatenate([[-np.inf], q, [np.nextafter(q[-1], np.inf), np.inf]])
    ref_share = np.histogram(reference, edges)[0] / len(reference)
    got_share = np.histogram(batch, edges)[0] / max(len(batch), 1)
    effect = psi(ref_share, got_share)
    detail = f"median {np.median(batch):.3g} (ref {np.median(reference):.3g})"
    return Statistic(name, "Kolmogorov-Smirnov", p, effect, p < threshold and effect >= min_psi, detail)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> tuple[float, float]:
    """(MMD², permutation p-value) of two samples under an RBF kernel with the median-distance bandwidth."""
    z = np.concatenate([x, y]).astype(np.float64)
    sq = (z**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    bandwidth = np.median(d2[np.triu_indices(len(z), 1)]) or 1.0
    kernel = np.exp(-d2 / bandwidth)
    # MMD² = s'Ks with s = 1/n on one sample's rows, -1/m on the other's: every permutation in one matrix product
    rng = np.random.default_rng(seed)
    orders = np.stack([np.arange(len(z))] + [rng.permutation(len(z)) for _ in range(permutations)])
    by_position = np.where(np.arange(len(z)) < len(x), 1.0 / len(x), -1.0 / len(y))  # the first n: one sample
    weights = np.empty(orders.shape)
    np.put_along_axis(weights, orders, np.broadcast_to(by_position, orders.shape), axis=1)  # order[i] gets i's
    values = ((weights @ kernel) * weights).sum(axis=1)
    observed, null = float(values[0]), values[1:]
    p = (1 + int((null >= observed).sum())) / (1 + permutations)
    return observed, float(p)


@dataclass(frozen=True)
class DriftRules:
    """When a statistic counts as drifted (see the module's docstring)."""

    alpha: float = 0.01
    min_psi: float = 0.1
    min_mmd: float = 0.01
    min_images: int = 30  # fewer scored images: no verdict


def check_drift(
    reference: DriftReference | None,
    reference_embeddings: np.ndarray,
    batch: DriftSample,
    rules: DriftRules = DriftRules(),
) -> DriftReport:
    """Compare a batch with a version's validation reference (`reference_sample` wrote it)."""
    tests = len(CATEGORICAL) + len(CONTINUOUS) + (1 if len(batch.embeddings) and len(reference_embeddings) else 0)
    threshold = rules.alpha / tests
    if reference is None or len(batch) < rules.min_images:
        return DriftReport(len(batch), [], rules.alpha)
    stats = [
        _categorical(name, reference.values(name), getattr(batch, name), threshold, rules.min_psi)
        for name in CATEGORICAL
    ]
    stats += [
        _continuous(
            name,
            np.asarray(reference.values(name), dtype=float),
            np.asarray(getattr(batch, name), dtype=float),
            threshold,
            rules.min_psi,
        )
        for name in CONTINUOUS
    ]
    if tests > len(stats):
        rng = np.random.default_rng(0)
        ref = reference_embeddings[rng.permutation(len(reference_embeddings))[:EMBEDDING_SAMPLE]]
        got = np.asarray(batch.embeddings, dtype=np.float64)
        got = got[rng.permutation(len(got))[:EMBEDDING_SAMPLE]]
        ref, got = _unit(ref), _unit(got)
        value, p = mmd_test(ref, got)
        stats.append(
            Statistic(
                "embedding", "MMD, permutation", p, value, p < threshold and value >= rules.min_mmd, f"MMD² {value:.3g}"
            )
        )
    return DriftReport(len(batch), stats, rules.alpha)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit


def reference_sample(sample: DriftSample, split: str = "val", max_values: int = 5000) -> DriftReference:
    """The reference of a version: the held-out split's statistics (sub-sampled past `max_values`)."""
    keep = np.random.default_rng(0).permutation(len(sample))[:max_values]

    def pick(name: str) -> list[Any]:
        values = getattr(sample, name)
        return [values[i] for i in keep]

    return DriftReference(
        predicted_class=pick("predicted_class"),
        format=pick("format"),
        confidence=pick("confidence"),
        brightness=pick("brightness"),
        contrast=pick("contrast"),
        long_side=pick("long_side"),
        images=len(sample),
        split=split,
    )

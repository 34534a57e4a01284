"""The drift check: batches of the training distribution pass (the false-alarm rate over seeds is printed), and
batches that are inverted, blurred, from another source size or another camera are flagged, each by the
statistics it moves. The model is small_cnn trained briefly on the xray demo set (dark background, bright body:
an inverted radiograph really is another image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cnn.config import IngestOptions, TrainConfig
from cnn.data.demo import generate
from cnn.data.ingest import ingest
from cnn.infer.predictor import Predictor
from cnn.io.decode import DecodeError, DecodeSpec, decode_file
from cnn.metrics.drift import DriftRules, DriftSample, check_drift, mmd_test, psi
from cnn.model.train import fit
from cnn.similarity.reference import build_reference
from tests.cnn.conftest import FAST


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, Path]:
    work = tmp_path_factory.mktemp("drift")
    data = generate("xray", work / "src", n=300, seed=0, size=64)
    root = work / "datasets" / "xray"
    ingest(data.source, root, IngestOptions(image_size=32, channels=1, decode_workers=1))
    result = fit(TrainConfig(epochs=4, **FAST), root, work / "run")  # type: ignore[arg-type]
    build_reference(result.run_dir, root)
    return Predictor.load(result.weights, result.contract), result.run_dir / "reference"


def _batch(predictor: Predictor, images: np.ndarray, size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> DriftSample:
    probs, vectors = predictor.predict_with_embeddings(images)
    labels = [predictor.contract.classes[i] for i in probs.argmax(axis=1)]
    return DriftSample.of(labels, probs.max(axis=1), images, [size] * len(images), [fmt] * len(images), vectors, 1000)


def _fresh(n: int, seed: int, folder: Path) -> np.ndarray:
    """New images of the training distribution (the demo generator, another seed) decoded as the model decodes."""
    made = generate("xray", folder / f"batch-{seed}", n=n, seed=seed, size=64)
    spec = DecodeSpec(channels=1, size=32)
    arrays = []
    for path in sorted(p for p in made.root.rglob("*.png") if "broken" not in p.name):
        try:
            arrays.append(decode_file(path, spec).array)
        except DecodeError:
            continue
    return np.stack(arrays[:n])


def test_batches_of_the_training_distribution_are_not_flagged(model: tuple[Predictor, Path], tmp_path: Path) -> None:
    from cnn.similarity.reference import Reference

    predictor, folder = model
    reference = Reference(folder)
    flagged = []
    for seed in range(8):
        report = check_drift(
            reference.drift(), reference.drift_embeddings(), _batch(predictor, _fresh(60, 100 + seed, tmp_path))
        )
        assert len(report.statistics) == 7
        flagged.append(report.drifted)
    print(f"false alarms: {sum(flagged)} of {len(flagged)} in-distribution batches")
    assert sum(flagged) <= 1


@pytest.mark.parametrize(
    ("shift", "moved"),
    [
        ("inverted", {"brightness"}),
        ("blurred", {"contrast"}),
        ("other source size", {"long_side"}),
        ("other camera (JPEG)", {"format"}),
    ],
)
def test_shifted_batches_are_flagged(
    model: tuple[Predictor, Path], shift: str, moved: set[str], tmp_path: Path
) -> None:
    from cnn.similarity.reference import Reference

    predictor, folder = model
    reference = Reference(folder)
    images, size, fmt = _fresh(60, 7, tmp_path), (64, 64), "PNG"
    if shift == "inverted":
        images = 255 - images
    elif shift == "blurred":
        blur = ImageFilter.GaussianBlur(2)
        images = np.stack([np.asarray(Image.fromarray(i[:, :, 0]).filter(blur))[:, :, None] for i in images])
    elif shift == "other source size":
        size = (1024, 768)
    else:
        fmt = "JPEG"
    report = check_drift(reference.drift(), reference.drift_embeddings(), _batch(predictor, images, size, fmt))
    drifted = {s.name for s in report.statistics if s.drifted}
    assert report.drifted and moved <= drifted, report.describe()
    assert report.describe().startswith("drift: ")


def test_small_batches_get_no_verdict_and_the_building_blocks() -> None:
    report = check_drift(None, np.zeros((0, 4)), DriftSample(confidence=[0.9] * 5), DriftRules(min_images=30))
    assert not report.drifted and report.statistics == [] and "no drift" in report.describe()
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == pytest.approx(0.0)
    assert psi(np.array([0.9, 0.1]), np.array([0.1, 0.9])) > 1
    rng = np.random.default_rng(0)
    same, p_same = mmd_test(rng.normal(0, 1, (80, 5)), rng.normal(0, 1, (80, 5)))
    moved, p_moved = mmd_test(rng.normal(0, 1, (80, 5)), rng.normal(1, 1, (80, 5)))
    assert p_same > 0.05 and p_moved < 0.01 and moved > same

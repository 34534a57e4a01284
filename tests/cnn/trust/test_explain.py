"""Explanations: Grad-CAM (as pytorch-grad-cam computes it) over the layer each architecture declares, feature
maps of every block, `explain_image`'s files, and a heat map that means something: a model whose classes differ only
by a patch in the top-left corner looks at that corner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnn.config import IngestOptions, TrainConfig
from cnn.data.dataset import Dataset
from cnn.data.ingest import ingest
from cnn.infer.predictor import Predictor
from cnn.model.contract import ModelContract
from cnn.model.networks import create_model, feature_blocks, list_models
from cnn.model.train import fit
from cnn.trust.evaluation import split_images
from cnn.trust.explain import _IMAGE_WEIGHT, explain_image, feature_maps, heatmaps, overlay, peak_quadrant
from tests.cnn.conftest import FAST


def _predictor(name: str, channels: int, size: int = 64) -> Predictor:
    torch.manual_seed(0)
    model = create_model(name, 3, channels).eval()
    contract = ModelContract(name, ["a", "b", "c"], channels, size, "pad", [0.5] * channels, [0.25] * channels)
    return Predictor(model, contract, torch.device("cpu"))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_every_model_explains_with_its_declared_layers(name: str, channels: int, tmp_path: Path) -> None:
    predictor = _predictor(name, channels)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, channels), dtype=np.uint8)
    maps = heatmaps(predictor, np.stack([image, image]), [0, 2])
    assert maps.shape == (2, 64, 64) and maps.min() >= 0.0 and maps.max() <= 1.0
    blocks = feature_maps(predictor, image)
    assert [b for b, _ in blocks] == [b for b, _ in feature_blocks(name, predictor.model)] and len(blocks) >= 2
    assert all(maps_.ndim == 3 for _, maps_ in blocks)
    explained = explain_image(predictor, image, "x", tmp_path)
    names = sorted(f.name for f in explained.files)
    assert names[:3] == ["x.cam.png", "x.features.png", "x.json"]
    summary = json.loads((tmp_path / "x.json").read_text())
    assert summary["label"] == explained.label and len(summary["top"]) == 3
    assert abs(sum(t["probability"] for t in summary["top"]) - 1.0) < 1e-4  # three classes: all of them
    assert Image.open(tmp_path / "x.cam.png").size[0] >= 224  # enlarged to be seen


def test_a_second_overlay_when_the_operating_point_decides_another_class(tmp_path: Path) -> None:
    from dataclasses import replace

    from cnn.metrics.operating_points import OperatingPoint

    predictor = _predictor("small_cnn", 1)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 1), dtype=np.uint8)
    probs = predictor.predict_arrays(image[None])[0]
    other = [c for c in range(3) if c != probs.argmax()][0]
    point = OperatingPoint(["a", "b", "c"][other], "threshold", 0.0, 0.0, True)  # fires for every image
    contract = replace(predictor.contract, operating_points=[point.to_dict()])
    explained = explain_image(replace(predictor, contract=contract), image, "y", tmp_path)
    assert explained.decision == point.class_name != explained.label
    assert (tmp_path / f"y.cam-{point.class_name}.png").is_file()


def _corner_image(label: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Noise, a distractor patch of either shade somewhere outside the top-left quadrant, and the deciding patch
    in the top-left corner: bright for `bright`, dark for `dark`."""
    image = rng.normal(128, 25, (size, size))
    y, x = rng.integers(size // 2, size - 7), rng.integers(0, size - 7)
    if rng.uniform() < 0.5:
        y, x = x, y  # top-right or bottom-left/right, never the top-left quadrant
        y, x = (y, max(x, size // 2)) if y < size // 2 else (y, x)
    image[y : y + 6, x : x + 6] = rng.choice([235.0, 20.0])
    image[2:10, 2:10] = 235.0 if label == "bright" else 20.0
    return np.clip(image, 0, 255).astype(np.uint8)


def test_the_heat_map_peaks_where_the_evidence_is(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / "src"
    for label in ("bright", "dark"):
        (source / label).mkdir(parents=True)
        for i in range(70):
            Image.fromarray(_corner_image(label, rng)).save(source / label / f"{i:03d}.png")
    root = tmp_path / "datasets" / "corner"
    ingest(
        source, root, IngestOptions(image_size=32, channels=1, decode_workers=1, val_fraction=0.2, test_fraction=0.3)
    )
    result = fit(TrainConfig(epochs=8, seed=0, **FAST), root, tmp_path / "run")  # type: ignore[arg-type]
    predictor = Predictor.load(result.weights, result.contract)
    images, labels, _ = split_images(Dataset(root), "test", result.contract)
    probs = predictor.predict_arrays(images)
    right = probs.argmax(axis=1) == labels
    assert right.mean() >= 0.9  # it learned the rule
    maps = heatmaps(predictor, images[right], probs.argmax(axis=1)[right])
    in_corner = np.mean([peak_quadrant(m) == 0 for m in maps])
    print(f"accuracy {right.mean():.2f}, heat map in the corner for {in_corner:.0%}")
    assert in_corner >= 0.8, f"the heat map peaks in the top-left quadrant for only {in_corner:.0%} of the images"


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_heat_maps_and_overlays_are_pytorch_grad_cams_own(name: str, channels: int) -> None:
    """The maps and overlays equal what pytorch-grad-cam's GradCAM and show_cam_on_image make of the same model."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cnn.model.contract import to_model_input
    from cnn.model.networks import cam_layer

    predictor = _predictor(name, channels)
    images = np.random.default_rng(1).integers(0, 256, (5, 64, 64, channels), dtype=np.uint8)
    targets = [0, 2, 1, 1, 0]
    ours = heatmaps(predictor, images, targets, batch_size=3)

    model, layer = predictor.model, cam_layer(name, predictor.model)
    mean, std = torch.tensor(predictor.contract.mean), torch.tensor(predictor.contract.std)
    x = to_model_input(torch.from_numpy(images), mean, std, predictor.device, channels_last=False)
    frozen = [p.requires_grad_(False) for p in model.parameters()]  # as heatmaps runs it: gradients at the layer
    hook = layer.register_forward_hook(lambda _m, _i, output: output.detach().requires_grad_(True).clone())
    try:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    finally:
        hook.remove()
        for param in frozen:
            param.requires_grad_(True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    rgb = images[0] if channels == 3 else np.repeat(images[0], 3, axis=2)
    drawn = show_cam_on_image(rgb.astype(np.float32) / 255.0, theirs[0], use_rgb=True, image_weight=_IMAGE_WEIGHT)
    ours_drawn = np.asarray(overlay(images[0], ours[0], side=64))
    assert np.abs(ours_drawn.astype(int) - drawn.astype(int)).max() <= 1  # a map within 1e-5: a level apart at most

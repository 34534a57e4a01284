"""Explanations you can look at: Grad-CAM heat maps over the layer each architecture declares in the model registry,
the feature maps of every convolution block (the hidden layers), and contact sheets of both.

Grad-CAM is computed here as pytorch-grad-cam's GradCAM computes it (the maintained implementation; a test holds our
maps and overlays equal to its own): importing that package loads scikit-learn, matplotlib and torchvision, about
2.5 s of every scoring run that draws a heat map, for a class score's gradient, a mean and a weighted sum.

Grad-CAM needs gradients, so it runs on an unfused fp32 copy of the model (never the scoring engine's folded,
autocast one); the heat map of a class does not depend on the temperature (a positive scale of the logits).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cnn.fsio import atomic_path, file_in, write_json_atomic
from cnn.infer.predictor import Predictor
from cnn.io.storage import is_url, write_object
from cnn.metrics.operating_points import decide
from cnn.model.contract import to_model_input
from cnn.model.networks import cam_layer, feature_blocks

VIEW = 224  # overlays are enlarged to at least this side: model inputs are often 28-64 px
_IMAGE_WEIGHT = 0.55  # of the image in an overlay; the rest is the heat map's colour


def heatmaps(predictor: Predictor, images: np.ndarray, targets: Sequence[int], batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] at the input size, for class `targets[i]` of image i: the gradient of the
    class score at the CAM layer, averaged over each channel, weighs that layer's activations; the positive part of
    the sum, scaled to [0, 1] and resized to the input (Selvaraju et al.; pytorch-grad-cam's GradCAM)."""
    if not len(images):
        return np.zeros((0, *images.shape[1:3]), dtype=np.float32)
    model = predictor.model
    mean = torch.tensor(predictor.contract.mean, device=predictor.device)
    std = torch.tensor(predictor.contract.std, device=predictor.device)
    layer = cam_layer(predictor.contract.model, model)
    out = []
    with _gradients_from(model, layer) as captured:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            x = to_model_input(batch, mean, std, predictor.device, channels_last=False)
            logits = model(x)
            wanted = torch.as_tensor(list(targets[start : start + batch_size]), device=logits.device)
            score = logits.gather(1, wanted[:, None]).sum()
            source, used = captured.pop()
            (grads,) = torch.autograd.grad(score, source)
            activations = used.detach().cpu().numpy()  # what the network went on with, as the library records
            weights = np.mean(grads.cpu().numpy(), axis=(2, 3))
            cam = np.maximum((weights[:, :, None, None] * activations).sum(axis=1), 0)
            size = (x.shape[-1], x.shape[-2])
            out.append(_scaled(_scaled(cam, size)))  # twice, as the library scales each layer's map, then the mean
    return np.concatenate(out)


def _scaled(cam: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Each map shifted to a minimum of 0 and divided by its maximum, resized (bilinear) to `size` (width, height)."""
    # imported here: OpenCV's bilinear resize of float maps, the library's; only when heat maps are drawn
    import cv2

    scaled = []
    for image in cam:
        image = image - np.min(image)
        image = image / (1e-7 + np.max(image))
        scaled.append(cv2.resize(image.astype(np.float32), size) if size is not None else image)
    return np.asarray(scaled, dtype=np.float32)


@contextmanager
def _gradients_from(
    model: torch.nn.Module, layer: torch.nn.Module
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Grad-CAM needs the gradient of a class score at `layer`'s output only: freeze every parameter and make
    that output the graph's leaf, so nothing before the layer is recorded and the backward pass stops there
    (several times faster than differentiating the whole network; the maps are the same)."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in frozen:
        param.requires_grad_(False)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # (the leaf, the layer's output as the network uses it)

    def leaf(_module: torch.nn.Module, _input: object, output: torch.Tensor) -> torch.Tensor:
        source = output.detach().requires_grad_(True)
        captured.append((source, source.clone()))  # a clone: an in-place layer after this one may change it
        return captured[-1][1]

    hook = layer.register_forward_hook(leaf)
    try:
        yield captured
    finally:
        hook.remove()
        for param, wanted in frozen:
            param.requires_grad_(wanted)


def overlay(image: np.ndarray, heatmap: np.ndarray, side: int = VIEW) -> Image.Image:
    """The heat map (jet colours) blended over the image, enlarged to at least `side` pixels."""
    # imported here: OpenCV's jet colour map, the library's; only when heat maps are drawn
    import cv2

    rgb = (image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)).astype(np.float32) / 255.0
    levels = (255 * heatmap).astype(np.uint8)
    jet = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    blended = (1 - _IMAGE_WEIGHT) * jet + _IMAGE_WEIGHT * rgb  # show_cam_on_image's blend
    picture = Image.fromarray((255 * (blended / np.max(blended))).astype(np.uint8))
    return picture.resize((side, side), Image.Resampling.BILINEAR) if picture.width < side else picture


def feature_maps(predictor: Predictor, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(block name, activations (C, h, w)) of every convolution block for one image, first to last."""
    blocks = feature_blocks(predictor.contract.model, predictor.model)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, output, name=name: captured.__setitem__(name, output.detach().float().clone())
        )
        for name, module in blocks
    ]
    mean = torch.tensor(predictor.contract.mean, device=predictor.device)
    std = torch.tensor(predictor.contract.std, device=predictor.device)
    try:
        with torch.inference_mode():
            predictor.model(to_model_input(torch.from_numpy(image[None].copy()), mean, std, predictor.device, False))
    finally:
        for hook in hooks:
            hook.remove()
    return [(name, captured[name][0].cpu().numpy()) for name, _ in blocks if name in captured]


def feature_grid(blocks: Sequence[tuple[str, np.ndarray]], per_block: int = 8, cell: int = 64) -> Image.Image:
    """One row per block: its `per_block` most active channels, each scaled to its own range."""
    label_width = 150
    sheet = Image.new("RGB", (label_width + per_block * (cell + 2), max(1, len(blocks)) * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, maps) in enumerate(blocks):
        top = row * (cell + 14)
        draw.text((4, top + cell // 2), f"{name}\n{maps.shape[0]}x{maps.shape[1]}x{maps.shape[2]}", fill="black")
        order = np.argsort(-maps.reshape(len(maps), -1).mean(axis=1))[:per_block]
        for col, channel in enumerate(order):
            fmap = maps[channel]
            low, high = float(fmap.min()), float(fmap.max())
            scaled = np.zeros_like(fmap) if high <= low else (fmap - low) / (high - low)
            tile = Image.fromarray((scaled * 255).astype(np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_width + col * (cell + 2), top + 10))
    return sheet


def save_png(picture: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (readers never see half a file)."""
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def save_jpeg(picture: Image.Image, path: Path | str) -> Path | str:
    """Write a JPEG atomically (a file), or in one request (an object store URL): the format of the overlays a
    scoring run writes in bulk (a smooth heat map loses nothing visible at quality 92, and encoding takes a
    thirtieth of PNG's time)."""
    if is_url(str(path)):
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=92)
        write_object(str(path), buffer.getvalue())
        return path
    with atomic_path(path) as tmp:
        picture.save(tmp, format="JPEG", quality=92)
    return path


@dataclass(frozen=True)
class ImageExplanation:
    """What `explain_image` wrote for one image, and the top classes it was explained with."""

    name: str
    label: str
    decision: str
    top: list[tuple[str, float]]  # (class, calibrated probability), most probable first
    files: list[Path]


def explain_image(
    predictor: Predictor, image: np.ndarray, name: str, out_dir: Path, top_k: int = 3
) -> ImageExplanation:
    """For one decoded image: a heat-map overlay for the predicted class (and for the decided class when the
    operating points decide another), a grid of the feature maps of each block, and a JSON of the top classes."""
    classes = predictor.contract.classes
    probs = predictor.predict_arrays(image[None])[0]
    label = int(probs.argmax())
    decision = int(decide(probs[None], classes, predictor.contract.points())[0])
    targets = [label] if decision == label else [label, decision]
    maps = heatmaps(predictor, np.repeat(image[None], len(targets), axis=0), targets)
    files = []
    for target, heat in zip(targets, maps):
        suffix = "" if target == label else f"-{classes[target]}"
        files.append(save_png(overlay(image, heat), file_in(out_dir, f"{name}.cam{suffix}.png")))
    files.append(save_png(feature_grid(feature_maps(predictor, image)), file_in(out_dir, f"{name}.features.png")))
    top = [(classes[j], float(probs[j])) for j in np.argsort(-probs)[:top_k]]
    summary = {
        "label": classes[label],
        "decision": classes[decision],
        "top": [{"class": c, "probability": round(p, 6)} for c, p in top],
        "temperature": predictor.contract.temperature,
        "files": [f.name for f in files],
    }
    files.append(write_json_atomic(file_in(out_dir, f"{name}.json"), summary))
    return ImageExplanation(name, classes[label], classes[decision], top, files)


def contact_sheet(
    images: np.ndarray, maps: np.ndarray, captions: Sequence[str], title: str, side: int = 128, columns: int = 4
) -> Image.Image:
    """A grid of overlays with a caption under each (the training run's most confident errors and least
    confident correct predictions)."""
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * (side + 4) + 4, 24 + rows * (side + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black")
    for i, (image, heat, caption) in enumerate(zip(images, maps, captions)):
        left, top = 4 + (i % columns) * (side + 4), 24 + (i // columns) * (side + 30)
        sheet.paste(overlay(image, heat, side).resize((side, side)), (left, top))
        for line, text in enumerate(caption.split("\n")[:2]):
            draw.text((left, top + side + 2 + 12 * line), text[:28], fill="black")
    return sheet


def peak_quadrant(heatmap: np.ndarray) -> int:
    """Which quadrant holds most of the heat map's mass: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    h, w = heatmap.shape
    quadrants = [heatmap[: h // 2, : w // 2], heatmap[: h // 2, w // 2 :], heatmap[h // 2 :, : w // 2]]
    quadrants.append(heatmap[h // 2 :, w // 2 :])
    return int(np.argmax([float(q.sum()) for q in quadrants]))


def tile_sheet(
    images: Sequence[np.ndarray | None], captions: Sequence[str], title: str, side: int = 128
) -> Image.Image:
    """Images in a row with a caption under each (a grey tile where an image is not at hand)."""
    sheet = Image.new("RGB", (len(images) * (side + 4) + 4, side + 44), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black")
    for i, (image, caption) in enumerate(zip(images, captions)):
        left = 4 + i * (side + 4)
        if image is None:
            tile = Image.new("RGB", (side, side), (200, 200, 200))
        else:
            rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
            tile = Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR)
        sheet.paste(tile, (left, 22))
        draw.text((left, side + 26), caption[:24], fill="black")
    return sheet

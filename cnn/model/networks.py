"""Model registry: `create_model(name, num_classes, in_channels, weights=None)` and `list_models()`.

Every model returns logits (softmax is applied at inference). Pretrained weights load from a local
file only; nothing is ever downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cnn.errors import UserError
from cnn.fsio import sha256_file

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]
    head: str  # attribute path of the classifier head (trained even when the backbone is frozen)
    pretrainable: bool
    blocks: Callable[[nn.Module], list[str]]  # the convolution blocks' outputs, first to last (the hidden layers)


_REGISTRY: dict[str, _Entry] = {}


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return sorted(_REGISTRY)


def head_prefix(name: str) -> str:
    """Parameter-name prefix of the model's classifier head."""
    return _entry(name).head


def feature_blocks(name: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the model's convolution blocks (hidden layers), first to last."""
    return [(path, _get(model, path)) for path in _entry(name).blocks(model)]


def classifier_layer(name: str, model: nn.Module) -> nn.Module:
    """The final linear layer: its input is the model's embedding (the last hidden layer). Found by name, so it is
    found in a model with batch norm folded too (fx keeps the module names)."""
    head = _get(model, head_prefix(name))
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"model {name!r} has no linear classifier at {head_prefix(name)!r}")
    return linears[-1]


def cam_layer(name: str, model: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains: the last convolution block, where the features still have a place."""
    return feature_blocks(name, model)[-1][1]


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(
    name: str, num_classes: int, in_channels: int = 3, weights: str | Path | None = None, **kwargs: Any
) -> nn.Module:
    """Build model `name` for `num_classes` classes and `in_channels` input channels."""
    entry = _entry(name)
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, not {num_classes}")
    if weights is not None and not entry.pretrainable:
        raise UserError(f"model {name!r} has no pretrained variant; train it from scratch (no --weights)")
    return entry.build(num_classes=num_classes, in_channels=in_channels, weights=weights, **kwargs)


def freeze_backbone(model: nn.Module, name: str, frozen: bool = True) -> None:
    """Freeze (or unfreeze) every parameter outside the classifier head."""
    prefix = head_prefix(name) + "."
    for param_name, param in model.named_parameters():
        param.requires_grad = (not frozen) or param_name.startswith(prefix)


# --- small_cnn -----------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv -> [batch norm] -> activation -> pool -> dropout, repeated; flatten -> dense -> logits."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        filters: tuple[int, ...] = (16, 32, 64, 64),
        kernel_size: int = 3,
        padding: Literal["same", "valid"] = "same",
        stride: int = 1,
        activation: str = "relu",
        dropout: float = 0.1,
        batch_norm: bool = True,
        dense: int = 128,
        pool_size: int = 4,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise UserError(f"unknown activation {activation!r}; choose one of: {', '.join(sorted(_ACTIVATIONS))}")
        if padding not in ("same", "valid"):
            raise UserError(f"padding must be 'same' or 'valid', not {padding!r}")
        if padding == "same" and stride != 1:
            raise UserError("padding 'same' needs stride 1 (PyTorch's rule); use padding 'valid' with stride > 1")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in filters:
            layers += [nn.Conv2d(channels, width, kernel_size, stride=stride, padding=padding, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [_ACTIVATIONS[activation](), nn.MaxPool2d(2, ceil_mode=True), nn.Dropout(dropout / 2)]
            channels = width
        self.features = nn.Sequential(*layers)
        # A fixed grid before flattening keeps the dense layer independent of the input size.
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * pool_size**2, dense),
            _ACTIVATIONS[activation](),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pool(self.features(x)))
        return logits


def _own(name: str, network: Callable[..., nn.Module], sizes: str) -> Callable[..., nn.Module]:
    """The builder of one of our own networks: its `sizes` option (a YAML list) as a tuple, and an unknown option a
    UserError that names the model."""

    def build(num_classes: int, in_channels: int, weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
        if sizes in kwargs:
            kwargs[sizes] = tuple(kwargs[sizes])
        try:
            return network(num_classes, in_channels, **kwargs)
        except TypeError as exc:
            raise UserError(f"{name}: {exc}") from None

    return build


def _small_cnn_blocks(model: nn.Module) -> list[str]:
    """The activation after each convolution (and its batch norm): one per block, before its pooling."""
    blocks, previous = [], None
    for name, module in model.features.named_children():  # type: ignore[union-attr]  # SmallCNN.features
        if isinstance(previous, (nn.Conv2d, nn.BatchNorm2d)) and not isinstance(module, nn.BatchNorm2d):
            blocks.append(f"features.{name}")
        previous = module
    return blocks


_REGISTRY["small_cnn"] = _Entry(
    _own("small_cnn", SmallCNN, "filters"), "head", pretrainable=False, blocks=_small_cnn_blocks
)


# --- small_resnet --------------------------------------------------------------------------


def _fixed(*paths: str) -> Callable[[nn.Module], list[str]]:
    """Blocks at fixed attribute paths (small_resnet's stages, torchvision's ResNet layers)."""
    return lambda model: list(paths)


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2, ceil_mode=True)] if pool else []))


class _Residual(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.block(x)
        return out


class SmallResNet(nn.Module):
    """The ResNet-9 layout of the CIFAR speed-run recipes, narrowed for CPUs: a stem, then three stages that each
    widen and halve the image, the first and last with a residual block of two convolutions; global pooling (max
    and mean, concatenated) and one linear layer. At 28 px and widths (16, 32, 64, 128) it costs 19M
    multiply-adds per image (small_cnn: 2.6M; 3.3x slower to train on 2 cores), for a sharper model of small images."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise UserError(f"small_resnet takes 4 widths (stem and three stages), not {len(widths)}")
        stem, w1, w2, w3 = widths
        self.stem = _conv_bn(in_channels, stem)
        self.layer1 = nn.Sequential(
            _conv_bn(stem, w1, pool=True), _Residual(nn.Sequential(_conv_bn(w1, w1), _conv_bn(w1, w1)))
        )
        self.layer2 = _conv_bn(w1, w2, pool=True)
        self.layer3 = nn.Sequential(
            _conv_bn(w2, w3, pool=True), _Residual(nn.Sequential(_conv_bn(w3, w3), _conv_bn(w3, w3)))
        )
        self.pool_max, self.pool_mean = nn.AdaptiveMaxPool2d(1), nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * w3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        logits: torch.Tensor = self.head(torch.cat([self.pool_max(x), self.pool_mean(x)], dim=1))
        return logits


_REGISTRY["small_resnet"] = _Entry(
    _own("small_resnet", SmallResNet, "widths"),
    "head",
    pretrainable=False,
    blocks=_fixed("stem", "layer1", "layer2", "layer3"),
)


# --- torchvision backbones -----------------------------------------------------------------


def _torchvision(arch: str, stem: str, head: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
        # imported here: heavy: only for torchvision's architectures and weights
        # imported here: heavy: only for torchvision's architectures and weights
        import torchvision

        if kwargs:
            raise UserError(f"{arch} takes no model options; got {', '.join(kwargs)}")
        model = getattr(torchvision.models, arch)(weights=None)  # weights=None: never a download
        if weights is not None:
            model.load_state_dict(_load_local_weights(weights, arch))
        _adapt_stem(model, stem, in_channels)
        _replace_head(model, head, num_classes)
        built: nn.Module = model
        return built

    return build


IMAGENET = "imagenet"  # --weights imagenet: torchvision's published weights for the architecture


def resolve_weights(spec: str | None, name: str, allow_download: bool = False) -> Path | None:
    """The local file `--weights` names: a path as given, or for `imagenet` torchvision's published weights of
    `name` in torch's own cache (`$TORCH_HOME/hub/checkpoints`), downloaded there only with `allow_download`."""
    if spec is None:
        return None
    if spec != IMAGENET:
        return Path(spec).expanduser()
    if not _entry(name).pretrainable:
        raise UserError(f"model {name!r} has no pretrained variant; train it from scratch (no --weights)")
    # imported here: heavy: only for torchvision's architectures and weights
    import torchvision

    return cached_weights_file(torchvision.models.get_model_weights(name).DEFAULT, allow_download)


def cached_weights_file(weights: Any, allow_download: bool = False) -> Path:
    """The file of a torchvision weights enum entry (its `url`, whose name carries the sha256 prefix torchvision
    publishes) in torch hub's cache, checked against that prefix; fetched with torch hub's own download (which
    checks the hash too) only when `allow_download`, else a UserError naming the exact file and where it goes."""
    # imported here: only where published weights are resolved
    import torch.hub

    url: str = weights.url
    filename = url.rsplit("/", 1)[-1]
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    published = torch.hub.HASH_REGEX.search(filename)
    if not target.is_file():
        if not allow_download:
            raise UserError(
                f"{filename} is not in torch's cache. Place that file (from {url}) at {target} "
                "(set TORCH_HOME to use another cache), or allow the download with --download-weights"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), published.group(1) if published else None)
    stat = target.stat()
    if published is not None and not _hash_starts_with(str(target), stat.st_size, stat.st_mtime_ns, published.group(1)):
        raise UserError(
            f"{target} does not match its published hash (sha256 {published.group(1)}...): a partial or altered "
            "download; delete it and place the published file again"
        )
    return target


@functools.lru_cache(maxsize=16)
def _hash_starts_with(path: str, size: int, mtime_ns: int, prefix: str) -> bool:
    """Whether the file's sha256 starts with `prefix`; checked once per file version in a process (a run resolves
    its weights more than once: the config check, then the model build)."""
    return sha256_file(Path(path)).startswith(prefix)


def _load_local_weights(path: str | Path, arch: str) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"pretrained weights not found: {path}. Weights load from a local file only (a torchvision "
            f"{arch} state_dict saved with torch.save); nothing is downloaded"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise UserError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    return state


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)  # also inside an fx GraphModule, whose containers are plain Modules


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    if last.isdigit():
        parent[int(last)] = module  # type: ignore[operator]  # Sequential supports item assignment
    else:
        setattr(parent, last, module)


def _adapt_stem(model: nn.Module, stem: str, in_channels: int) -> None:
    """Give the first convolution `in_channels` inputs, keeping pretrained filters (averaged for gray)."""
    conv = _get(model, stem)
    assert isinstance(conv, nn.Conv2d)
    if in_channels == conv.in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]  # torch types it tuple[int, ...]; it holds two ints
        conv.stride,  # type: ignore[arg-type]  # as kernel_size
        conv.padding,  # type: ignore[arg-type]  # as kernel_size
        conv.dilation,  # type: ignore[arg-type]  # as kernel_size
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3 / in_channels))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    _set(model, stem, new)


def _replace_head(model: nn.Module, head: str, num_classes: int) -> None:
    old = _get(model, head)
    assert isinstance(old, nn.Linear)
    _set(model, head, nn.Linear(old.in_features, num_classes))


def _children(parent: str) -> Callable[[nn.Module], list[str]]:
    """Every child of `parent` is a block (torchvision's `features` sequences)."""
    return lambda model: [f"{parent}.{name}" for name, _ in _get(model, parent).named_children()]


_RESNET_BLOCKS = _fixed("relu", "layer1", "layer2", "layer3", "layer4")
_DENSENET_BLOCKS = _fixed(
    "features.pool0",
    "features.denseblock1",
    "features.denseblock2",
    "features.denseblock3",
    "features.denseblock4",
    "features.norm5",
)
# (architecture, stem convolution, classifier head, blocks: the last one is Grad-CAM's target layer)
for _arch, _stem, _head, _blocks in [
    ("resnet18", "conv1", "fc", _RESNET_BLOCKS),
    ("resnet50", "conv1", "fc", _RESNET_BLOCKS),
    ("efficientnet_b0", "features.0.0", "classifier.1", _children("features")),
    ("mobilenet_v3_small", "features.0.0", "classifier.3", _children("features")),
    ("densenet121", "features.conv0", "classifier", _DENSENET_BLOCKS),
    ("convnext_tiny", "features.0.0", "classifier.2", _children("features")),
]:
    _REGISTRY[_arch] = _Entry(_torchvision(_arch, _stem, _head), _head, pretrainable=True, blocks=_blocks)

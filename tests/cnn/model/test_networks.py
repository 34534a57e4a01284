"""Model registry: every model trains on CPU with 1 and 3 channels; weights only from local files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnn.errors import UserError
from cnn.model.networks import create_model, freeze_backbone, head_prefix, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_and_backward(name: str, channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_channels=channels)
    x = torch.randn(2, channels, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 4)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_registry_lists_required_models_and_rejects_unknown() -> None:
    assert {
        "small_cnn",
        "resnet18",
        "resnet50",
        "efficientnet_b0",
        "mobilenet_v3_small",
        "densenet121",
        "convnext_tiny",
    } <= set(list_models())
    with pytest.raises(UserError, match="choose one of: .*resnet18"):
        create_model("vgg_ultra", 3, 3)


def test_local_pretrained_weights_and_gray_stem(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    model = create_model("resnet18", 2, 1, weights=tmp_path / "r18.pt")
    expected = reference.conv1.weight.mean(dim=1, keepdim=True) * 3
    assert torch.allclose(model.conv1.weight, expected)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.fc.out_features == 2
    with pytest.raises(UserError, match="nothing is downloaded"):
        create_model("resnet18", 2, 3, weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(UserError, match="cannot read weights"):
        create_model("resnet18", 2, 3, weights=tmp_path / "junk.pt")
    with pytest.raises(UserError, match="no pretrained variant"):
        create_model("small_cnn", 2, 3, weights=tmp_path / "r18.pt")


def test_freeze_backbone_leaves_only_the_head() -> None:
    model = create_model("mobilenet_v3_small", 3, 3)
    freeze_backbone(model, "mobilenet_v3_small")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(head_prefix("mobilenet_v3_small") + ".") for n in trainable)
    freeze_backbone(model, "mobilenet_v3_small", frozen=False)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "options",
    [
        {"activation": "elu", "padding": "valid", "stride": 2, "batch_norm": False, "filters": [8, 16]},
        {"activation": "tanh", "filters": [8, 16], "kernel_size": 5, "dropout": 0.0},
        {"activation": "leaky_relu", "dense": 32},
        {"activation": "sigmoid"},
    ],
)
def test_small_cnn_options(options: dict[str, object]) -> None:
    model = create_model("small_cnn", 3, 1, **options)
    assert model(torch.randn(2, 1, 96, 96)).shape == (2, 3)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"activation": "swishy"}, "unknown activation"),
        ({"padding": "same", "stride": 2}, "stride 1"),
        ({"pooling": "max"}, "small_cnn"),
    ],
)
def test_small_cnn_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_model("small_cnn", 3, 1, **options)


def test_imagenet_weights_come_from_torchs_cache_checked_against_the_published_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--weights imagenet` names torchvision's published file and where it goes; a file placed there is checked
    against the sha256 prefix in its published name, then loaded; nothing is downloaded unless allowed."""
    import hashlib

    from torchvision.models import get_model_weights
    from torchvision.models._api import Weights

    from cnn.model.networks import cached_weights_file, resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    published = get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]  # resnet18-f37072fd.pth
    with pytest.raises(UserError, match=f"{published} is not in torch's cache. Place that file") as missing:
        resolve_weights("imagenet", "resnet18")
    assert str(checkpoints / published) in str(missing.value) and "--download-weights" in str(missing.value)
    with pytest.raises(UserError, match="no pretrained variant"):
        resolve_weights("imagenet", "small_cnn")

    checkpoints.mkdir(parents=True)
    torch.save(create_model("resnet18", 1000).state_dict(), checkpoints / published)  # not the published bytes
    with pytest.raises(UserError, match="does not match its published hash"):
        resolve_weights("imagenet", "resnet18")

    # A file this test places under the name its own hash gives, through the same enum-entry path:
    source = create_model("resnet18", 1000)
    staged = tmp_path / "staged.pth"
    torch.save(source.state_dict(), staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    placed = checkpoints / f"resnet18-{digest[:8]}.pth"
    staged.rename(placed)
    entry = Weights(url=f"https://download.invalid/models/{placed.name}", transforms=None, meta={})
    found = cached_weights_file(entry)
    assert found == placed
    model = create_model("resnet18", 3, 3, found)  # the backbone takes the file's weights, the head is new
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    assert resolve_weights(str(placed), "resnet18") == placed and resolve_weights(None, "resnet18") is None


def test_small_resnet_has_its_stages_as_blocks_and_a_linear_head() -> None:
    from cnn.model.networks import cam_layer, classifier_layer, feature_blocks

    model = create_model("small_resnet", 10, 1, widths=[8, 16, 32, 64])
    assert [name for name, _ in feature_blocks("small_resnet", model)] == ["stem", "layer1", "layer2", "layer3"]
    assert cam_layer("small_resnet", model) is model.layer3
    assert classifier_layer("small_resnet", model).in_features == 2 * 64  # max and mean pooling, concatenated
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UserError, match="4 widths"):
        create_model("small_resnet", 10, 1, widths=[8, 16])

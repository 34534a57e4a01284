"""The default recipe's rule (cnn.model.recipe): what a config leaves to the data becomes a model, a batch size, a
learning rate and a policy from the image size, channels and training images; what the user set is kept."""

from __future__ import annotations

import math

import pytest

from cnn.config import TrainConfig
from cnn.errors import UserError
from cnn.model.recipe import resolve_recipe
from cnn.model.train import check_config


@pytest.mark.parametrize(
    ("size", "channels", "images", "model", "batch", "policy"),
    [
        (28, 1, 21_000, "small_resnet", 128, "shift"),  # small grayscale images, many of them
        (32, 3, 4_096, "small_resnet", 128, "light"),  # RGB: flips too
        (28, 1, 4_095, "small_cnn", 32, "none"),  # too few for a large batch, or for augmentation to pay
        (33, 1, 100_000, "small_cnn", 32, "shift"),  # larger images: the residual net costs too much on a CPU
    ],
)
def test_the_rule_decides_from_size_channels_and_images(
    size: int, channels: int, images: int, model: str, batch: int, policy: str
) -> None:
    decided = resolve_recipe(TrainConfig(), size, channels, images)
    assert (decided.model, decided.batch_size, decided.policy) == (model, batch, policy)
    assert decided.lr == pytest.approx(3e-3 * math.sqrt(batch / 32))  # the square-root rule


def test_what_the_user_set_is_kept() -> None:
    mine = TrainConfig(model="resnet18", batch_size=16, lr=1e-4, policy="none")
    assert resolve_recipe(mine, 28, 1, 50_000) is mine
    half = resolve_recipe(TrainConfig(batch_size=512), 28, 1, 50_000)  # the learning rate follows the chosen batch
    assert half.batch_size == 512 and half.lr == pytest.approx(3e-3 * 4)


def test_auto_is_a_valid_model_but_not_with_weights() -> None:
    check_config(TrainConfig())  # model: auto
    with pytest.raises(UserError, match="set --model"):
        check_config(TrainConfig(weights="imagenet"))
    with pytest.raises(UserError, match="choose one of: auto, "):
        check_config(TrainConfig(model="vgg_ultra"))

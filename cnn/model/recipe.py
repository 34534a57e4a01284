"""The default recipe's rule: what a training config leaves to the data (`model`, `batch_size`, `lr`, `policy` set
to `auto`, or unset) becomes, from the image size and the number of training images.

Chosen with `bench/recipe.py` on 21,000 generated 28 px garments and the demo sets (the table is in docs/train.md,
"The default recipe"). The rule, in words:
- images of at most SMALL_IMAGE px and at least MANY_IMAGES training images: the compact residual net
  (`small_resnet`) at batch LARGE_BATCH; where its cost per image outgrows the budget (larger images) or there are
  too few images for a large batch to take enough steps, `small_cnn` at batch BASE_BATCH;
- the learning rate follows the batch: BASE_LR x sqrt(batch / BASE_BATCH) (the square-root rule of adaptive
  optimisers);
- augmentation `auto`: none under MANY_IMAGES training images (on the demo sets at 1-minute budgets it only slowed
  learning), else shifts (and flips for RGB; never for grayscale, where X-rays are and anatomy has a side).
"""

from __future__ import annotations

import math

from cnn.config import TrainConfig
from cnn.data.augment import resolve_policy

AUTO = "auto"
BASE_BATCH, BASE_LR = 32, 3e-3
LARGE_BATCH = 128
SMALL_IMAGE = 32  # px: measured there; at 48-64 px the residual net runs at a third of its 28 px speed and batch 128
# is slower than batch 32 (bench/train.py), so larger images keep small_cnn at batch 32
IN_PROCESS_AUGMENT = 64  # px: up to this side augmentation runs in the training process, not in loader workers
MANY_IMAGES = 4096  # training images: at batch LARGE_BATCH, at least 32 steps an epoch


def _small_and_many(image_size: int, train_images: int) -> bool:
    """Where the residual net at a large batch was measured to win (bench/recipe.py)."""
    return image_size <= SMALL_IMAGE and train_images >= MANY_IMAGES


def default_model(image_size: int, train_images: int) -> str:
    """The network `model: auto` becomes."""
    return "small_resnet" if _small_and_many(image_size, train_images) else "small_cnn"


def default_batch_size(image_size: int, train_images: int) -> int:
    """The batch size an unset `batch_size` becomes."""
    return LARGE_BATCH if _small_and_many(image_size, train_images) else BASE_BATCH


def default_policy(channels: int, train_images: int) -> str:
    """The augmentation `policy: auto` becomes: none under MANY_IMAGES training images (at short budgets on small
    sets augmentation only slowed learning: docs/train.md), else shifts, with flips for RGB only."""
    return "none" if train_images < MANY_IMAGES else resolve_policy(AUTO, channels)


def scaled_lr(batch_size: int) -> float:
    """The peak learning rate an unset `lr` becomes at `batch_size`."""
    return BASE_LR * math.sqrt(batch_size / BASE_BATCH)


def resolve_recipe(cfg: TrainConfig, image_size: int, channels: int, train_images: int) -> TrainConfig:
    """`cfg` with what it left to the data decided; a config with nothing left is returned as it is."""
    batch = cfg.batch_size or default_batch_size(image_size, train_images)
    decided = {
        "model": default_model(image_size, train_images) if cfg.model == AUTO else cfg.model,
        "batch_size": batch,
        "lr": cfg.lr or scaled_lr(batch),
        "policy": default_policy(channels, train_images) if cfg.policy == AUTO else cfg.policy,
    }
    if all(getattr(cfg, key) == value for key, value in decided.items()):
        return cfg
    return cfg.model_copy(update=decided)

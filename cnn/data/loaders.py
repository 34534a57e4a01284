"""Training data from the ingest cache: uint8 arrays, augmented in DataLoader workers, no decoding per epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler
from torch.utils.data import Dataset as TorchDataset

from cnn.data.augment import Policy, policy_from_dict
from cnn.data.dataset import Dataset, ShardedImages
from cnn.errors import UserError
from cnn.io.pool import pool_context


@dataclass(frozen=True)
class SplitData:
    """Where a split's images are in the cache (its shard files and global slots), with labels and source rows."""

    shard_files: tuple[str, ...]
    slots: np.ndarray
    labels: np.ndarray
    paths: list[str]
    image_ids: list[str]

    def read_images(self) -> np.ndarray:
        """The split's images, in row order, as one uint8 NHWC array read from the cache."""
        return ShardedImages.open(self.shard_files).read(self.slots)


def load_split(dataset: Dataset, split: str, classes: list[str]) -> SplitData:
    """The ok rows of `split` (one per distinct image), resolved to cache slots."""
    rows = dataset.usable(split, distinct=True)
    index = dataset.open_cache().index()
    missing = [i for i in rows["image_id"] if i not in index]
    if missing:
        raise UserError(
            f"dataset {dataset.name}: {len(missing)} images are missing from the cache; re-run `cnn ingest`"
        )
    slots = np.array([index[i] for i in rows["image_id"]], dtype=np.int64)
    labels = np.array([classes.index(label) for label in rows["label"]], dtype=np.int64)
    return SplitData(tuple(dataset.shard_files()), slots, labels, rows["path"].tolist(), rows["image_id"].tolist())


class CacheDataset(TorchDataset[tuple[np.ndarray, int]]):
    """Items are (uint8 HWC image, label); batches come out as uint8 NHWC tensors."""

    def __init__(self, data: SplitData, policy: dict[str, Any] | None = None) -> None:
        self.data = data
        self.policy_dict = policy or None
        self._images: ShardedImages | None = None
        self._policy: Policy | None = None

    def __len__(self) -> int:
        return len(self.data.slots)

    @property
    def images(self) -> ShardedImages:
        if self._images is None:  # opened lazily: each DataLoader worker maps the files itself
            self._images = ShardedImages.open(self.data.shard_files)
        return self._images

    @property
    def policy(self) -> Policy | None:
        if self._policy is None and self.policy_dict:
            self._policy = policy_from_dict(self.policy_dict)
        return self._policy

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        image = self.images.read(self.data.slots[i : i + 1])[0]
        return (self.policy(image) if self.policy else image), int(self.data.labels[i])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one read per shard of the cache."""
        idx = np.asarray(indices)
        batch = self.images.read(self.data.slots[idx])
        if self.policy is not None:
            batch = np.stack([self.policy(image) for image in batch])
        return torch.from_numpy(np.ascontiguousarray(batch)), torch.from_numpy(self.data.labels[idx])

    def reseed(self, seed: int) -> None:
        if self.policy is not None:
            self.policy.seed(seed)


def _collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None:
        info.dataset.reseed(int(torch.initial_seed() % 2**31))  # type: ignore[attr-defined]  # our CacheDataset


def make_loader(
    dataset: CacheDataset,
    batch_size: int,
    train: bool,
    workers: int,
    sampler_weights: np.ndarray | None = None,
    sampler: Sampler[int] | None = None,
) -> DataLoader[tuple[np.ndarray, int]]:
    """A DataLoader over the cache; shuffled (or weighted-sampled, or by `sampler`) for training, in order otherwise."""
    if train and sampler_weights is not None:
        sampler = WeightedRandomSampler(sampler_weights.astype(np.float64).tolist(), len(dataset), replacement=True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,  # type: ignore[arg-type]  # __getitems__ hands over a whole batch, not a list
        worker_init_fn=_seed_worker,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=bool(workers),
        prefetch_factor=4 if workers else None,
        multiprocessing_context=pool_context() if workers else None,
    )

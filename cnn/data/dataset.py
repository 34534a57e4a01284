"""An ingested dataset on disk: manifest, metadata and the memory-mapped uint8 image cache.

Layout of `datasets/NAME/`:
  CURRENT                       the name of the current generation: written last (fsynced), the commit point
  generations/<gen>/manifest.parquet   one row per source file (MANIFEST_COLUMNS)
  generations/<gen>/dataset.json       metadata, with the token of the cache this generation uses
  report.json/.md               the dataset report
  cache/images-<shard>.npy      uint8 array (N, H, W, C), opened with np.load(mmap_mode="r")
  cache/ids-<shard>.npy         the image_id (sha256) of each slot of that shard ("" marks an unused slot)

The cache is a list of append-only shards (dataset.json names them, in order): an ingest writes the images it
decoded into one new shard and leaves the earlier ones as they are, so adding 1% of new images writes about 1% of
the cache. Images whose files left the source stay in their shard as dead slots until the dead slots outnumber
the live ones (or the shards grow too many); then the ingest compacts the live images into one shard.

An ingest writes a new generation beside the current one and then switches CURRENT in one rename, so the
manifest, the metadata and the cache change together; a kill at any point leaves the previous dataset as it
was. A dataset written before generations existed (manifest.parquet and dataset.json in the folder) is read
as it is, and moves to the new layout at its next ingest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from cnn.choices import DATASET_NAME, SPLITS
from cnn.limits import DEFAULT_MAX_FILE_BYTES
from cnn.errors import UserError
from cnn.fsio import fsync_path
from cnn.formats import migrated
from cnn.io.storage import is_url

MANIFEST_COLUMNS = [
    "image_id",
    "path",
    "label",
    "split",
    "group",
    "width",
    "height",
    "format",
    "status",
    "reason",
    "reject_kind",
    "size_bytes",
    "mtime_ns",
    "version",  # an object's version id or ETag ("" for a local file)
    "reviewed",  # the label came from a reviewer (a filled-in review table)
]
POINTER = "CURRENT"
META_FORMAT = 2  # dataset.json: 1 named one cache file (`cache_token`); 2 names the cache's shards
GENERATIONS = "generations"


def usable_rows(manifest: pd.DataFrame, split: str | None = None, distinct: bool = False) -> pd.DataFrame:
    """The rows of a manifest (or staged frame) that decoded: optionally one split, optionally one row per image."""
    rows = manifest[manifest["status"] == "ok"]
    if split is not None:
        rows = rows[rows["split"] == split]
    return rows.drop_duplicates("image_id") if distinct else rows


def validate_name(name: str) -> str:
    """Return `name` if it is a safe dataset or model name, else raise UserError."""
    if not DATASET_NAME.match(name or ""):
        raise UserError(
            f"invalid name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


@dataclass
class DatasetMeta:
    """What dataset.json records: how the cache was built, how splits were drawn, what it holds."""

    name: str
    source: str
    layout: str
    image_size: int
    channels: int
    resize: str
    seed: int
    val_fraction: float
    test_fraction: float
    group_column: str
    classes: list[str] = field(default_factory=list)
    cache_shards: list[str] = field(default_factory=list)  # the tokens of the cache's shards, oldest first
    updated_at: str = ""
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # the decode limit of this ingest; models trained on it carry it
    format_version: int = META_FORMAT

    def cache_key(self) -> tuple[int, int, str]:
        """Decoding parameters; a change invalidates the cache."""
        return (self.image_size, self.channels, self.resize)

    def split_key(self) -> tuple[int, float, float, str]:
        """Splitting parameters; a change redraws the splits."""
        return (self.seed, self.val_fraction, self.test_fraction, self.group_column)

    def identity(self) -> str:
        """Which data this dataset is, beyond its name: a digest of where it was ingested from (a pseudonym of the
        source, never the path), so a name re-used for other data is told apart by the promotion gate."""
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()[:16]

    def for_sharing(self) -> dict[str, object]:
        """dataset.json as shared stores (MLflow) may hold it: the source by its folder's name (or its URL without
        credentials), never the absolute path on the host that ingested it."""
        source = self.source if is_url(self.source) else PurePath(self.source).name
        return {**asdict(self), "source": source}


class Dataset:
    """Read access to an ingested dataset folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._generation: Path | None = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def generation(self) -> Path:
        """The folder of the current generation, read once per Dataset object so that its manifest, metadata
        and cache always belong together (the dataset folder itself for the layout before generations)."""
        if self._generation is not None:
            return self._generation
        try:
            name = (self.root / POINTER).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return self.root  # nothing committed yet, or the earlier layout
        self._generation = self.root / GENERATIONS / name
        return self._generation

    @property
    def manifest_path(self) -> Path:
        return self.generation / "manifest.parquet"

    @property
    def meta_path(self) -> Path:
        return self.generation / "dataset.json"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def exists(self) -> bool:
        return self.meta_path.is_file() and self.manifest_path.is_file()

    def require(self) -> Dataset:
        """Raise a UserError naming the fix when the dataset has not been ingested."""
        if not self.exists():
            raise UserError(
                f"dataset {self.name!r} not found under {self.root.parent}; "
                f"run `cnn ingest SOURCE --dataset {self.name}` first"
            )
        return self

    def meta(self) -> DatasetMeta:
        return self.meta_of(self.generation)

    @staticmethod
    def meta_of(folder: Path) -> DatasetMeta:
        """The metadata of one generation folder."""
        data = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        return DatasetMeta(**migrated(data, META_FORMAT, {1: _sharded_cache}, f"{folder.name}/dataset.json"))

    def manifest(self) -> pd.DataFrame:
        manifest = pd.read_parquet(self.manifest_path)
        if "reject_kind" not in manifest.columns:  # written before reject kinds existed
            manifest.insert(MANIFEST_COLUMNS.index("reject_kind"), "reject_kind", None)
        if "reviewed" not in manifest.columns:  # written before review tables existed
            manifest["reviewed"] = False
        if "version" not in manifest.columns:  # written before object stores: local files only
            manifest.insert(MANIFEST_COLUMNS.index("version"), "version", "")
        return manifest

    def usable(self, split: str | None = None, distinct: bool = False) -> pd.DataFrame:
        """The manifest rows that decoded (see `usable_rows`)."""
        return usable_rows(self.manifest(), split, distinct)

    def publish(self, generation: str) -> None:
        """Make `generations/<generation>` current: its files reach the disk first, then the pointer, in one
        rename (the commit point), then the folder's entry of the pointer."""
        folder = self.root / GENERATIONS / generation
        meta = self.meta_of(folder)
        durable = [*folder.iterdir(), folder, folder.parent]
        if meta.cache_shards:
            durable += [path for token in meta.cache_shards for path in self.cache_paths(token)] + [self.cache_dir]
        for path in durable:
            fsync_path(path)
        pointer = self.root / POINTER
        tmp = pointer.with_name(f".{POINTER}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(generation + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, pointer)
        fsync_path(self.root)
        self._generation = folder

    def cache_paths(self, token: str) -> tuple[Path, Path]:
        return self.cache_dir / f"images-{token}.npy", self.cache_dir / f"ids-{token}.npy"

    def open_cache(self, shards: Sequence[str] | None = None) -> ImageCache:
        """Memory-map the image cache's shards (no decoding, no copy); the current generation's by default."""
        tokens = self.meta().cache_shards if shards is None else shards
        present = [token for token in tokens if self.cache_paths(token)[0].is_file()]
        if not present:
            return ImageCache.empty()
        images = ShardedImages.open([str(self.cache_paths(token)[0]) for token in present])
        return ImageCache(images, np.concatenate([self.shard_ids(token) for token in present]))

    def shard_ids(self, token: str) -> np.ndarray:
        """The image_id of each slot of one shard ("" for an unused slot)."""
        ids: np.ndarray = np.load(self.cache_paths(token)[1], allow_pickle=False)
        return ids

    def shard_files(self) -> list[str]:
        """The image files of the current cache's shards, in order (what a training reader opens)."""
        return [str(self.cache_paths(token)[0]) for token in self.meta().cache_shards]


def _sharded_cache(data: dict[str, Any]) -> dict[str, Any]:
    """dataset.json format 1 -> 2: the one cache file of an ingest before shards is the cache's only shard."""
    legacy = data.pop("cache_token", "")
    return {**data, "cache_shards": data.get("cache_shards") or ([legacy] if legacy else [])}


class ShardedImages:
    """uint8 images kept in several arrays (the cache's shards), read by global slot: a shard's offset plus the
    slot within it. A batch from one shard is one fancy-indexed read, as from a single file."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = list(arrays)
        self.offsets = np.cumsum([0, *(len(a) for a in self.arrays)])

    @classmethod
    def open(cls, paths: Sequence[str]) -> ShardedImages:
        """Memory-map the shard files read-only."""
        return cls([np.load(path, mmap_mode="r") for path in paths])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of every image; (1, 1, 1) for an empty cache."""
        return tuple(self.arrays[0].shape[1:]) if self.arrays else (1, 1, 1)

    def read(self, slots: np.ndarray | Sequence[int]) -> np.ndarray:
        """The images at global `slots`, in that order, as one uint8 NHWC array."""
        slots = np.asarray(slots, dtype=np.int64)
        if len(self.arrays) == 1:
            one: np.ndarray = np.asarray(self.arrays[0][slots])
            return one
        shard_of = np.searchsorted(self.offsets, slots, side="right") - 1
        out = np.empty((len(slots), *self.image_shape), dtype=np.uint8)
        for shard in np.unique(shard_of):
            here = shard_of == shard
            out[here] = self.arrays[shard][slots[here] - self.offsets[shard]]
        return out


@dataclass
class ImageCache:
    """The uint8 images of a dataset, addressed by image_id, across its shards."""

    images: ShardedImages
    ids: np.ndarray  # (N,) str, one per global slot
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls) -> ImageCache:
        return cls(ShardedImages([]), np.zeros((0,), dtype="<U64"))

    def __len__(self) -> int:
        """The distinct images held (parts of one ingest may each have stored the same image)."""
        return len(set(self.ids.tolist()) - {""})

    def index(self) -> dict[str, int]:
        """Map image_id -> global slot (built once: `get` is called per image)."""
        if self._index is None:
            self._index = {str(image_id): i for i, image_id in enumerate(self.ids) if image_id}
        return self._index

    def get(self, image_id: str) -> np.ndarray:
        slot = self.index().get(image_id)
        if slot is None:
            raise KeyError(image_id)
        image: np.ndarray = self.images.read([slot])[0]
        return image


def cached_images(dataset: Dataset | None, image_ids: Sequence[str]) -> list[np.ndarray | None]:
    """The images of these ids from the dataset's cache, as decoded for training (None for an id not there, or
    for every id where the dataset is not on this machine)."""
    if dataset is None or not dataset.exists():
        return [None] * len(image_ids)
    cache = dataset.open_cache()
    index = cache.index()
    return [np.asarray(cache.get(i)) if i in index else None for i in image_ids]

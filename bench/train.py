"""Training throughput of the engine against (a) the same model and steps on tensors already in memory
(the compute limit) and (b) torchvision ImageFolder with PIL transforms over the original files.

    python bench/train.py [--n 1000] [--size 64] [--sizes 28,64,224] [--epochs 3] [--model small_cnn]
                          [--source-width 640] [--no-precisions]

First, at each of `--sizes`: the engine (augmentation off, the weight average on, batch 64 and the rule's batch
for the size) against the same model and steps on tensors already in memory with the same fused optimiser (the
compute limit): the ratio says how much of a step is overhead (target >= 0.85).

The engine reads the uint8 memmap cache (no decoding), augments in DataLoader workers when a policy is
on, and converts/normalises on the device. Each contender runs `--epochs` epochs of the same model,
batch size and optimiser; the first epoch is warm-up and the rest are timed. Targets with augmentation
off: engine >= 0.85 x (a) and >= 1.5 x (b). Those comparisons run in fp32; then the engine reads the same images
from a cache of 10 shards (as an ingest fanned out to Dask in 10 parts writes it) against the one-shard cache,
interleaved (target: the same speed); then it trains in fp32, bf16 autocast and compiled (fp32 and bf16) side by
side, same seed, with each one's validation accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cnn.config import TrainConfig
from cnn.data.dataset import Dataset
from cnn.data.demo import generate
from cnn.data.ingest import (
    IngestOptions,
    commit_dataset,
    decode_part,
    finish_decode,
    ingest,
    plan_decode,
    stage_scan,
    stage_split,
)
from cnn.data.loaders import load_split
from cnn.model.contract import ModelContract
from cnn.model.networks import create_model
from cnn.model.train import fit

BATCH = 64


def engine(root: Path, work: Path, model: str, epochs: int, policy: str, **options: Any) -> float:
    return engine_run(root, work, model, epochs, policy, **{"precision": "fp32", **options})[0]


def engine_run(
    root: Path, work: Path, model: str, epochs: int, policy: str, **options: Any
) -> tuple[float, float, str]:
    """`fit` as `cnn train` runs it: (images/s over the timed epochs, last epoch's validation accuracy, precision)."""
    cfg = TrainConfig(
        model=model,
        epochs=epochs,
        batch_size=options.pop("batch_size", BATCH),
        policy=policy,
        patience=0,
        imbalance="none",
        grad_clip=None,
        **options,
    )
    result = fit(cfg, root, work / f"engine-{policy}-{'-'.join(f'{k}={v}' for k, v in options.items())}")
    timed = result.history[1:]
    rate = sum(h.train_images_per_s for h in timed) / len(timed)
    return rate, result.history[-1].val.get("accuracy", float("nan")), result.precision_reason


def sharded(source: Path, work: Path, options: IngestOptions, parts: int) -> Path:
    """The dataset as an ingest fanned out in `parts` parts writes it (one cache shard per part), decoded here."""
    root = work / "ds-sharded"
    files = len(list(source.rglob("*.jpg")))
    fanned = options.model_copy(update={"dask_workers": 1, "files_per_part": -(-files // parts)})
    stage_scan(source, root, fanned)
    plan = plan_decode(root, fanned)
    finish_decode(root, fanned, [decode_part(root, fanned, part) for part in range(plan.parts)])
    stage_split(root, fanned)
    commit_dataset(root, fanned)
    return root


def shards_row(root: Path, source: Path, work: Path, model: str, epochs: int, options: IngestOptions) -> None:
    """The engine on the one-shard cache and on a 10-shard cache of the same images, two interleaved rounds."""
    many = sharded(source, work, options, 10)
    shards = len(Dataset(many).meta().cache_shards)
    rates: dict[str, list[float]] = {"1 shard": [], f"{shards} shards": []}
    for _ in range(2):
        rates["1 shard"].append(engine(root, work, model, epochs, "none"))
        rates[f"{shards} shards"].append(engine(many, work, model, epochs, "none"))
    one, split = (max(r) for r in rates.values())
    print("\ncache read across shards (augmentation off, fp32, best of 2 interleaved rounds):")
    print(f"  1 shard {one:8.1f} images/s; {shards} shards {split:8.1f} images/s; ratio {split / one:.2f} (target 1.0)")


def precisions(root: Path, work: Path, model: str, epochs: int) -> None:
    """fp32 against bf16 autocast against torch.compile (each in fp32 and bf16), same seed and data, side by side:
    speed over fp32's and the last epoch's validation accuracy; then what `--precision auto` picks here."""
    runs = {
        "fp32 (baseline)": {"precision": "fp32"},
        "bf16 autocast": {"precision": "bf16"},
        "compiled fp32": {"precision": "fp32", "compile": True},
        "compiled bf16": {"precision": "bf16", "compile": True},
    }
    measured = {name: engine_run(root, work, model, epochs, "none", **options) for name, options in runs.items()}
    base = measured["fp32 (baseline)"][0]
    width = max(len(n) for n in measured)
    print(f"\nCPU training precision ({model}, augmentation off, same seed):")
    for name, (rate, accuracy, _) in measured.items():
        print(f"  {name:<{width}}  {rate:8.1f} images/s  {rate / base:5.2f}x  val accuracy {accuracy:.4f}")
    print(f"  auto picks: {engine_run(root, work, model, 2, 'none', precision='auto')[2]}")


def _train_steps(
    model: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], epochs: int
) -> float:
    """Run `epochs` epochs over `batches()` and return images/s over all but the first."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as the engine's (build_optimizer)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    for _ in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for x, y in batches():
            x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen += len(y)
        rates.append(seen / (time.perf_counter() - start))
    return sum(rates[1:]) / len(rates[1:])


def in_memory(root: Path, model_name: str, epochs: int, batch: int = BATCH) -> float:
    dataset = Dataset(root)
    meta = dataset.meta()
    split = load_split(dataset, "train", meta.classes)
    images = torch.from_numpy(split.read_images())
    mean, std = ModelContract.normalisation(meta.channels, False)
    x_all = ((images.permute(0, 3, 1, 2).float() / 255) - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(
        std
    ).view(1, -1, 1, 1)
    y_all = torch.from_numpy(split.labels)
    torch.manual_seed(0)
    model = create_model(model_name, len(meta.classes), meta.channels).to(memory_format=torch.channels_last)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(y_all))
        return ((x_all[idx], y_all[idx]) for idx in order.split(batch))

    return _train_steps(model, batches, epochs)


def image_folder(root: Path, source: Path, model_name: str, epochs: int, augment: bool, workers: int) -> float:
    """What a user writes by hand: ImageFolder + PIL transforms, decoding every JPEG every epoch."""
    from torchvision import datasets, transforms

    meta = Dataset(root).meta()
    train_paths = set(load_split(Dataset(root), "train", meta.classes).paths)
    steps = [transforms.Resize((meta.image_size, meta.image_size))]
    if augment:
        steps += [
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.2, 0.2, 0.2, 0.03),
            transforms.RandomPerspective(0.06, p=0.3),
            transforms.RandomApply([transforms.GaussianBlur(3)], p=0.2),
        ]
    mean, std = ModelContract.normalisation(meta.channels, False)
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    folder = datasets.ImageFolder(
        str(source), transform=transforms.Compose(steps), is_valid_file=lambda p: str(Path(p).resolve()) in train_paths
    )
    loader = DataLoader(folder, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = create_model(model_name, len(meta.classes), meta.channels).to(memory_format=torch.channels_last)
    return _train_steps(model, lambda: loader, epochs)


def sizes_table(work: Path, source: Path, model: str, epochs: int, sizes: list[int]) -> None:
    """Images/s of the engine against the in-memory limit at each size, at batch 64 and at the rule's batch."""
    from cnn.model.recipe import default_batch_size

    print(f"{model}, fp32, augmentation off, weight average on; images/s (engine / in-memory limit)")
    for size in sizes:
        root = work / f"ds-{size}"
        ingest(source, root, IngestOptions(image_size=size, channels=3))
        train = len(load_split(Dataset(root), "train", Dataset(root).meta().classes).labels)
        cells = []
        for batch in sorted({BATCH, default_batch_size(size, max(train, 4096))}):
            limit = in_memory(root, model, epochs, batch)
            rate = engine(root, work / f"size-{size}", model, epochs, "none", batch_size=batch)
            cells.append(f"batch {batch}: {rate:7.1f} / {limit:7.1f} = {rate / limit:.2f}")
        print(f"  {size:>3} px   " + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sizes", default="28,64,224", help="sizes of the engine-against-limit table ('' skips it)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--source-width", type=int, default=640, help="width of the generated JPEGs (4:3)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for ImageFolder")
    parser.add_argument("--no-precisions", action="store_true", help="skip fp32 vs bf16 vs compiled")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = generate("claims", work / "src", n=args.n, size=args.source_width)
        if args.sizes:
            sizes_table(work, made.source, args.model, args.epochs, [int(v) for v in args.sizes.split(",")])
        root = work / "ds"
        options = IngestOptions(image_size=args.size, channels=3)
        ingest(made.source, root, options)
        print(
            f"claims: {args.n} JPEGs {args.source_width}x{args.source_width * 3 // 4} -> {args.size}px RGB, "
            f"{args.model}, batch {BATCH}, "
            f"{torch.get_num_threads()} torch threads, timed epochs {args.epochs - 1}"
        )
        limit = in_memory(root, args.model, args.epochs)
        rows = [("(a) tensors in memory, no augmentation (limit)", limit, None)]
        off = engine(root, work, args.model, args.epochs, "none")
        folder_off = image_folder(root, made.source, args.model, args.epochs, False, args.workers)
        rows += [
            ("engine, augmentation off", off, None),
            (f"(b) ImageFolder + PIL, {args.workers} workers, no augmentation", folder_off, None),
        ]
        on = engine(root, work, args.model, args.epochs, "photo")
        folder_on = image_folder(root, made.source, args.model, args.epochs, True, args.workers)
        rows += [
            ("engine, policy photo (2 workers)", on, None),
            (f"(b) ImageFolder + PIL, {args.workers} workers, similar augmentation", folder_on, None),
        ]
        width = max(len(r[0]) for r in rows)
        for name, rate, _ in rows:
            print(f"{name:<{width}}  {rate:8.1f} images/s")
        print(
            f"\naugmentation off: engine / (a) = {off / limit:.2f} (target >= 0.85); "
            f"engine / (b) = {off / folder_off:.2f}x (target >= 1.5x)"
        )
        print(f"policy photo:     engine / (b) = {on / folder_on:.2f}x")
        shards_row(root, made.source, work, args.model, args.epochs, options)
        if not args.no_precisions:
            precisions(root, work, args.model, max(args.epochs, 4))


if __name__ == "__main__":
    main()

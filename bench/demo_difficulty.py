"""How hard are the demo datasets? Majority class and a linear model on raw pixels against a small CNN.

    python bench/demo_difficulty.py [--kind xray|claims] [--n 600] [--size 64] [--epochs 30]

Generates the set, ingests it with the library, then reports test accuracy and balanced accuracy
(mean per-class recall) of each model on the same split. The demo data is meant to defeat the first
two and not the third.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from torch import nn

from cnn.data import load_split
from cnn.dataset import Dataset
from cnn.demo_data import generate
from cnn.ingest import IngestOptions, ingest


def load_xy(dataset: Dataset, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = load_split(dataset, split, classes)
    return data.read_images(), data.labels


def small_cnn(channels: int, classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(channels, 16), block(16, 32), block(32, 64), block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, classes))


def train_cnn(x: np.ndarray, y: np.ndarray, classes: int, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = small_cnn(x.shape[-1], classes)
    data = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    target = torch.from_numpy(y)
    weights = torch.tensor(len(y) / (classes * np.bincount(y, minlength=classes)), dtype=torch.float32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y)).split(32):
            optimiser.zero_grad()
            loss_fn(model(data[batch]), target[batch]).backward()
            optimiser.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="xray")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = generate(args.kind, Path(tmp) / "src", n=args.n)
        channels = 1 if args.kind == "xray" else 3
        root = Path(tmp) / "ds"
        ingest(made.source, root, IngestOptions(image_size=args.size, channels=channels))
        dataset = Dataset(root)
        classes = dataset.meta().classes
        x_train, y_train = load_xy(dataset, "train", classes)
        x_test, y_test = load_xy(dataset, "test", classes)
        results = {}
        majority = np.full_like(y_test, np.bincount(y_train).argmax())
        results["majority class"] = majority
        linear = LogisticRegression(max_iter=2000, class_weight="balanced", C=0.1)
        linear.fit(x_train.reshape(len(x_train), -1) / 255.0, y_train)
        results["logistic regression, raw pixels"] = linear.predict(x_test.reshape(len(x_test), -1) / 255.0)
        model = train_cnn(x_train, y_train, len(classes), args.epochs)
        with torch.inference_mode():
            logits = model(torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255.0)
        results[f"small CNN, {args.epochs} epochs"] = logits.argmax(1).numpy()
        print(f"{args.kind}: {len(y_train)} train / {len(y_test)} test images at {args.size}px, classes {classes}")
        for name, pred in results.items():
            print(f"{name:<34} accuracy {accuracy_score(y_test, pred):.3f}   "
                  f"balanced accuracy {balanced_accuracy_score(y_test, pred):.3f}")


if __name__ == "__main__":
    main()

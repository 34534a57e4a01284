"""The training engine: `fit` orchestrates; `train_one_epoch` and `predict_probs` do the work.

Reads the ingest cache (no decoding per epoch), augments uint8 arrays in DataLoader workers, and
checkpoints every epoch atomically with everything needed to resume bit-for-bit on CPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from cnn.augment import load_policy, validate_policy
from cnn.config import TrainConfig
from cnn.contract import ModelContract, to_model_input
from cnn.data import CacheDataset, load_split, make_loader
from cnn.distributed import Dist
from cnn.dataset import Dataset
from cnn.errors import UserError
from cnn.fsio import atomic_path, write_json_atomic, write_text_atomic
from cnn.metrics import ClassificationMetrics, compute_metrics
from cnn.models import create_model, freeze_backbone

# Settings that must match for --resume to continue the same optimisation.
_RESUME_KEYS = ("model", "model_options", "weights", "batch_size", "lr", "weight_decay", "optimizer", "momentum",
                "schedule", "warmup_epochs", "label_smoothing", "imbalance", "policy", "seed", "freeze_epochs")


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return to_model_input(batch, self.mean, self.std, self.device, self.channels_last)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


@dataclass
class FitResult:
    """What a training run produced."""

    run_dir: Path
    weights: Path  # best.pt: state_dict of the best epoch
    contract: ModelContract
    best_epoch: int
    best_score: float | None
    epochs_run: int
    stopped: str  # "completed" | "early_stopping" | "time_budget"
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"

    def save_summary(self, path: Path, **extra: Any) -> Path:
        """fit.json: everything but the contract (saved beside it as contract.json)."""
        summary = {k: v for k, v in asdict(self).items() if k != "contract"}
        return write_json_atomic(path, {**summary, **extra})


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an unavailable device is a UserError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available; use --device auto or cpu")
    return device


def _amp(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """bf16 autocast on CUDA where supported, else fp16 with a grad scaler; full precision on CPU."""
    if device.type != "cuda" or not enabled:
        return None, torch.amp.GradScaler("cpu", enabled=False)
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False)
    return torch.float16, torch.amp.GradScaler("cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """Per-step schedule: linear warm-up, then cosine decay (or constant); or one-cycle."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=max(warmup / total, 0.05))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    loss_fn: nn.Module, rt: Runtime, grad_clip: float | None, epoch: int,
                    deadline: float | None) -> tuple[float, int, int, bool]:
    """One pass over the training data; returns (summed loss, images, optimizer steps, ran out of time)."""
    model.train()
    total, seen, steps = 0.0, 0, 0
    for step, (images, labels) in enumerate(loader):
        x, y = rt.inputs(images), labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped and the last "
                "good checkpoint was kept. Lower --lr, enable gradient clipping, or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        rt.scaler.scale(loss).backward()
        if grad_clip:
            rt.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        scheduler.step()
        total += loss.item() * len(y)
        seen += len(y)
        steps += 1
        if deadline is not None and time.monotonic() > deadline:
            return total, seen, steps, True
    return total, seen, steps, False


@torch.inference_mode()
def predict_probs(model: nn.Module, loader: Any, rt: Runtime) -> tuple[np.ndarray, np.ndarray, float]:
    """Softmax probabilities, labels and mean cross-entropy over a loader, in order."""
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for images, y in loader:
        with rt.autocast():
            logits = model(rt.inputs(images))
        logits = logits.float()
        y = y.to(rt.device)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
    if not probs:
        return np.zeros((0, 0)), np.zeros((0,), dtype=np.int64), float("nan")
    labels_np = np.concatenate(labels)
    return np.concatenate(probs), labels_np, loss_sum / len(labels_np)


def evaluate(model: nn.Module, loader: Any, rt: Runtime, classes: list[str]) -> ClassificationMetrics:
    probs, labels, loss = predict_probs(model, loader, rt)
    return compute_metrics(probs, labels, classes, loss)


# --- fit --------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": [list(map(int, random.getstate()[1]))],
            "python_version": int(random.getstate()[0]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(state["python"][0]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _class_weights(labels: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return len(labels) / (k * np.maximum(counts, 1))


class _Setup:
    """Everything fit needs, built once (and rebuilt identically on resume)."""

    def __init__(self, cfg: TrainConfig, dataset: Dataset, dist: Dist) -> None:
        meta = dataset.meta()
        self.classes = meta.classes
        self.policy = load_policy(cfg.policy)
        validate_policy(self.policy, meta.channels, meta.image_size)
        mean, std = ModelContract.normalisation(meta.channels, pretrained=cfg.weights is not None)
        self.contract = ModelContract(cfg.model, self.classes, meta.channels, meta.image_size, meta.resize, mean, std,
                                      cfg.model_options, self.policy.to_dict(), dataset.name)
        self.train = load_split(dataset, "train", self.classes)
        self.val = load_split(dataset, "val", self.classes)
        if len(self.train.slots) == 0:
            raise UserError(f"dataset {dataset.name} has no training images")
        workers = cfg.workers if cfg.workers is not None else (0 if cfg.policy == "none" else 2)
        policy = None if cfg.policy == "none" else self.policy.to_dict()
        weights = _class_weights(self.train.labels, len(self.classes))
        sampler = weights[self.train.labels] if cfg.imbalance == "sampler" else None
        train_data = CacheDataset(self.train, policy)
        if dist.enabled:
            if cfg.batch_size % dist.world:
                raise UserError(f"batch size {cfg.batch_size} must be divisible by the {dist.world} processes")
            if sampler is not None or cfg.freeze_epochs:
                raise UserError("distributed training supports imbalance none/class_weights and no freeze_epochs")
            self.sampler = DistributedSampler(train_data, dist.world, dist.rank, shuffle=True, seed=cfg.seed)
            self.train_loader = make_loader(train_data, cfg.batch_size // dist.world, True, workers,
                                            sampler=self.sampler)
        else:
            self.sampler = None
            self.train_loader = make_loader(train_data, cfg.batch_size, True, workers, sampler)
        self.val_loader = make_loader(CacheDataset(self.val), cfg.batch_size * 2, False, 0)
        loss_weight = torch.tensor(weights, dtype=torch.float32) if cfg.imbalance == "class_weights" else None
        self.loss_weight = loss_weight


def check_config(cfg: TrainConfig) -> None:
    """Catch mistakes before any work starts: unknown model, bad policy, missing weights, bad device."""
    from cnn.models import list_models

    if cfg.model not in list_models():
        raise UserError(f"unknown model {cfg.model!r}; choose one of: {', '.join(list_models())}")
    load_policy(cfg.policy)
    if cfg.weights is not None and not Path(cfg.weights).expanduser().is_file():
        raise UserError(f"pretrained weights not found: {cfg.weights} (weights load from a local file only)")
    resolve_device(cfg.device)


def fit(cfg: TrainConfig, dataset_root: str | Path, run_dir: str | Path, resume: bool = False,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Train `cfg.model` on an ingested dataset, checkpointing into `run_dir` every epoch."""
    dataset, run_dir = Dataset(dataset_root).require(), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist = Dist.from_env()
    device = dist.device(resolve_device(cfg.device))
    created = dist.start(device)
    try:
        result = _fit(cfg, dataset, run_dir, resume, on_epoch, dist, device)
        # Leave together: a rank tearing down while another still uses the store aborts the job.
        dist.barrier()
        return result
    finally:
        dist.stop(created)


def _fit(cfg: TrainConfig, dataset: Dataset, run_dir: Path, resume: bool,
         on_epoch: Callable[[dict[str, float]], None] | None, dist: Dist, device: torch.device) -> FitResult:
    seed_everything(cfg.seed)
    setup = _Setup(cfg, dataset, dist)
    model = create_model(cfg.model, len(setup.classes), setup.contract.channels, cfg.weights, **cfg.model_options)
    _check_input_size(model, cfg.model, setup.contract)
    amp_dtype, scaler = _amp(device, cfg.amp)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory)
    rt = Runtime(device, torch.tensor(setup.contract.mean, device=device), torch.tensor(setup.contract.std, device=device),
                 cfg.channels_last, amp_dtype, scaler)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(setup.train_loader))
    loss_fn = nn.CrossEntropyLoss(weight=None if setup.loss_weight is None else setup.loss_weight.to(device),
                                  label_smoothing=cfg.label_smoothing)
    state = {"epoch": 0, "best_epoch": 0, "best_score": None, "stale": 0, "history": []}
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if resume and last.is_file():
        state = _restore(last, cfg, model, optimizer, scheduler, scaler)
    step_model: nn.Module = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
    stopped = "completed"
    for epoch in range(state["epoch"], cfg.epochs):
        if not dist.enabled:
            freeze_backbone(model, cfg.model, frozen=epoch < cfg.freeze_epochs)
        if setup.sampler is not None:
            setup.sampler.set_epoch(epoch)
        setup.train_loader.dataset.reseed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        start = time.perf_counter()
        # Under DDP every rank must run the same steps: the time budget is checked between epochs only.
        loss_sum, seen, steps, out_of_time = train_one_epoch(step_model, setup.train_loader, optimizer, scheduler,
                                                             loss_fn, rt, cfg.grad_clip, epoch,
                                                             None if dist.enabled else deadline)
        if dist.enabled and deadline is not None:
            out_of_time = dist.any(time.monotonic() > deadline)
        train_loss, seen = dist.mean(loss_sum, seen)
        seconds = time.perf_counter() - start
        if not dist.main:
            state = dist.broadcast(None)
            if state["stop"]:
                break
            continue
        val = evaluate(model, setup.val_loader, rt, setup.classes) if len(setup.val.slots) else None
        record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                  "steps": steps, "epoch_seconds": seconds, "train_images_per_s": seen / max(seconds, 1e-9)}
        if val is not None:
            record.update({f"val_{k}": v for k, v in val.headline().items()})
        score = None if val is None else val.headline().get(cfg.monitor)
        improved = state["best_score"] is None or (score is not None and score > state["best_score"])
        if improved or val is None:
            state.update(best_epoch=epoch + 1, best_score=score, stale=0)
            _save(model.state_dict(), best)
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        state["history"].append(record)
        _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "scaler": scaler.state_dict(), "rng": _rng_state(), "config": cfg.model_dump(mode="json"),
               **state}, last)
        if epoch == 0 or not (run_dir / "contract.json").is_file():
            setup.contract.save(run_dir / "contract.json")
            write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        if on_epoch is not None:
            on_epoch(record)
        if out_of_time:
            stopped = "time_budget"
        elif cfg.patience and state["stale"] >= cfg.patience:
            stopped = "early_stopping"
        state["stop"] = stopped != "completed"
        dist.broadcast(state)
        if state.pop("stop"):
            break
    return FitResult(run_dir, best, setup.contract, state["best_epoch"], state["best_score"], state["epoch"],
                     stopped, state["history"], str(device))


def _check_input_size(model: nn.Module, name: str, contract: ModelContract) -> None:
    """Fail early, with the reason, when the network cannot take the dataset's image size."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, contract.channels, contract.image_size, contract.image_size))
    except RuntimeError as exc:
        raise UserError(f"model {name} with these options cannot take {contract.image_size}x{contract.image_size} "
                        f"images ({exc}); use larger images, fewer layers, or stride 1") from None
    finally:
        model.train(was_training)


def _restore(path: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             scaler: torch.amp.GradScaler) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint["config"]
    current = cfg.model_dump(mode="json")
    changed = [k for k in _RESUME_KEYS if saved.get(k) != current.get(k)]
    if changed:
        raise UserError(f"cannot resume {path.parent}: the checkpoint was made with different {', '.join(changed)}; "
                        "resume with the same settings or start a new run")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    _set_rng_state(checkpoint["rng"])
    return {k: checkpoint[k] for k in ("epoch", "best_epoch", "best_score", "stale", "history")}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict saved by `fit` (weights only: no pickled objects)."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model

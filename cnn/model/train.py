"""The training engine, shaped like torchvision's reference script: `fit` only orchestrates; a typed
`TrainState` goes to and from checkpoints; `train_one_epoch`, `end_of_epoch` and `save_checkpoint` do the work.

Reads the ingest cache (no decoding per epoch), augments uint8 arrays in DataLoader workers, and
checkpoints every epoch atomically with everything needed to resume bit-for-bit on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from cnn import stopping
from cnn.config import TrainConfig
from cnn.data.augment import load_policy, resolve_policy, validate_policy
from cnn.data.dataset import Dataset
from cnn.data.loaders import CacheDataset, SplitData, load_split, make_loader
from cnn.errors import UserError
from cnn.fsio import atomic_path, write_text_atomic
from cnn.metrics.classification import ClassificationMetrics, compute_metrics
from cnn.model import recipe
from cnn.model.budget import Budget, Schedule
from cnn.model.contract import ModelContract
from cnn.model.distributed import Dist
from cnn.model.ema import WeightAverage
from cnn.model.networks import create_model, freeze_backbone, list_models, resolve_weights
from cnn.model.precision import PrecisionChoice, choose_training_precision, interleaved_speedups, training_amp
from cnn.model.run import EpochRecord, FitResult, RunFolder, Stopped
from cnn.model.runtime import Runtime, resolve_device, rng_state, seed_everything, set_rng_state

# Settings that must match for --resume to continue the same optimisation.
_RESUME_KEYS = (
    "model",
    "model_options",
    "weights",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "schedule",
    "warmup_epochs",
    "label_smoothing",
    "imbalance",
    "policy",
    "seed",
    "freeze_epochs",
    "ema",
)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Where a run stands between epochs; everything but the tensors `to_checkpoint` adds."""

    epoch: int = 0
    best_epoch: int = 0
    best_score: float | None = None
    stale: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    precision: str = ""  # the precision the run chose (a resumed run keeps it)

    def to_checkpoint(self, parts: _Parts, cfg: TrainConfig) -> dict[str, Any]:
        """last.pt's content: weights, optimiser, schedule, scaler, every RNG, the config and this state."""
        return {
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.rt.scaler.state_dict(),
            "average": None if parts.average is None else parts.average.state_dict(),
            "rng": rng_state(),
            "config": cfg.model_dump(mode="json"),
            **asdict(self),
        }

    @classmethod
    def from_checkpoint(cls, path: Path, cfg: TrainConfig, parts: _Parts) -> TrainState:
        """Restore `parts` and the RNGs from last.pt; refuse settings that would change the optimisation."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved, current = checkpoint["config"], cfg.model_dump(mode="json")
        changed = [k for k in _RESUME_KEYS if saved.get(k) != current.get(k)]
        if changed:
            raise UserError(
                f"cannot resume {path.parent}: the checkpoint was made with different "
                f"{', '.join(changed)}; resume with the same settings or start a new run"
            )
        parts.model.load_state_dict(checkpoint["model"])
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        parts.scheduler.load_state_dict(checkpoint["scheduler"])
        parts.rt.scaler.load_state_dict(checkpoint["scaler"])
        if parts.average is not None:
            parts.average.load_state_dict(checkpoint["average"])
        set_rng_state(checkpoint["rng"])
        state = {k: checkpoint[k] for k in ("epoch", "best_epoch", "best_score", "stale")}
        return cls(**state, history=[EpochRecord.from_dict(h) for h in checkpoint["history"]])


@dataclass
class _Parts:
    """The objects one run trains with."""

    model: nn.Module  # whose weights are saved
    step_model: nn.Module  # what the training steps call: the model, compiled and/or wrapped for DDP
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    rt: Runtime
    average: WeightAverage | None = None  # the weights' moving average, when the config keeps one

    @property
    def kept(self) -> nn.Module:
        """The weights that are validated and saved: the moving average where there is one, else the model's."""
        return self.average.module if self.average is not None else self.model


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (one kernel for all parameters, on CPU and CUDA; the default per-tensor loop
    cost a tenth of a small image's step), or Nesterov SGD with the foreach kernels (fused SGD fails on a momentum
    buffer that a frozen backbone never made: freeze_epochs)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.peak_lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=True,
            foreach=True,
        )
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.peak_lr,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """Per-step schedule: linear warm-up, then cosine decay (or constant); or one-cycle. Under a time budget the plan
    moves the schedule's end, so one-cycle there is warm-up + cosine too (cnn.model.budget.Schedule)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle" and not cfg.max_minutes:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.peak_lr, total_steps=total, pct_start=max(warmup / total, 0.05)
        )
    kind = "constant" if cfg.schedule == "constant" else "cosine"
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(kind, warmup, total))


@dataclass(frozen=True)
class EpochStats:
    """One pass over the training data: summed loss, images, optimizer steps, and whether time ran out."""

    loss_sum: float
    images: int
    steps: int
    out_of_time: bool


def train_one_epoch(
    parts: _Parts,
    loader: DataLoader[Any],
    grad_clip: float | None,
    epoch: int,
    deadline: float | None,
    budget: Budget | None = None,
) -> EpochStats:
    """One pass over the training data (cut short when `deadline` passes, or where a budget's plan ends)."""
    model, rt = parts.step_model, parts.rt
    model.train()
    total, seen, steps = 0.0, 0, 0
    for step, (images, labels) in enumerate(loader):
        stopping.check()  # a safe point: between steps (the last epoch's checkpoint is kept)
        x, y = rt.inputs(images), labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            loss = parts.loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped and the last "
                "good checkpoint was kept. Lower --lr, enable gradient clipping, or check the data"
            )
        parts.optimizer.zero_grad(set_to_none=True)
        rt.scaler.scale(loss).backward()
        if grad_clip:
            rt.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        rt.scaler.step(parts.optimizer)
        rt.scaler.update()
        parts.scheduler.step()
        if parts.average is not None:
            parts.average.step(parts.model)
        total += loss.item() * len(y)
        seen += len(y)
        steps += 1
        if budget is not None and budget.after_step():
            return EpochStats(total, seen, steps, budget.out_of_time())
        if deadline is not None and time.monotonic() > deadline:
            return EpochStats(total, seen, steps, True)
    return EpochStats(total, seen, steps, False)


@torch.inference_mode()
def predict_probs(model: nn.Module, loader: DataLoader[Any], rt: Runtime) -> tuple[np.ndarray, np.ndarray, float]:
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


def evaluate(model: nn.Module, loader: DataLoader[Any], rt: Runtime, classes: list[str]) -> ClassificationMetrics:
    """Metrics of the model being trained on a loader (the per-epoch validation)."""
    probs, labels, loss = predict_probs(model, loader, rt)
    return compute_metrics(probs, labels, classes, loss)


def _class_weights(labels: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return np.asarray(len(labels) / (k * np.maximum(counts, 1)))


class _Setup:
    """The data side of a run (contract, splits, loaders), built once and rebuilt identically on resume."""

    def __init__(self, cfg: TrainConfig, dataset: Dataset, dist: Dist) -> None:
        meta = dataset.meta()
        self.classes = meta.classes
        self.policy_name = resolve_policy(cfg.policy, meta.channels)
        self.policy = load_policy(self.policy_name)
        validate_policy(self.policy, meta.channels, meta.image_size)
        mean, std = ModelContract.normalisation(meta.channels, pretrained=cfg.weights is not None)
        self.contract = ModelContract(
            cfg.model,
            self.classes,
            meta.channels,
            meta.image_size,
            meta.resize,
            mean,
            std,
            cfg.model_options,
            self.policy.to_dict(),
            dataset.name,
            max_file_bytes=meta.max_file_bytes,
            dataset_id=meta.identity(),
        )
        self.train: SplitData = load_split(dataset, "train", self.classes)
        self.val: SplitData = load_split(dataset, "val", self.classes)
        if len(self.train.slots) == 0:
            raise UserError(f"dataset {dataset.name} has no training images")
        augmented = self.policy_name != "none"
        # Small images augment in a few microseconds each: in this process that costs less than two workers that
        # compete with the training threads for the same cores (bench/train.py).
        in_workers = augmented and meta.image_size > recipe.IN_PROCESS_AUGMENT
        workers = cfg.loader_workers if cfg.loader_workers is not None else (2 if in_workers else 0)
        policy = self.policy.to_dict() if augmented else None
        weights = _class_weights(self.train.labels, len(self.classes))
        sampler = weights[self.train.labels] if cfg.imbalance == "sampler" else None
        self.train_data = CacheDataset(self.train, policy)
        self.sampler: DistributedSampler[int] | None = None
        if dist.enabled:
            if cfg.batch % dist.world:
                raise UserError(f"batch size {cfg.batch} must be divisible by the {dist.world} processes")
            if sampler is not None or cfg.freeze_epochs:
                raise UserError("distributed training supports imbalance none/class_weights and no freeze_epochs")
            self.sampler = DistributedSampler(self.train_data, dist.world, dist.rank, shuffle=True, seed=cfg.seed)
            self.train_loader = make_loader(
                self.train_data, cfg.batch // dist.world, True, workers, sampler=self.sampler
            )
        else:
            self.train_loader = make_loader(self.train_data, cfg.batch, True, workers, sampler)
        self.val_loader = make_loader(CacheDataset(self.val), cfg.batch * 2, False, 0)
        self.loss_weight = torch.tensor(weights, dtype=torch.float32) if cfg.imbalance == "class_weights" else None


def check_config(cfg: TrainConfig) -> None:
    """Catch mistakes before any work starts: unknown model, bad policy, missing weights, bad device."""
    if cfg.model != recipe.AUTO and cfg.model not in list_models():
        raise UserError(f"unknown model {cfg.model!r}; choose one of: auto, {', '.join(list_models())}")
    if cfg.model == recipe.AUTO and (cfg.weights or cfg.model_options):
        raise UserError("--weights and model options belong to a named model: set --model too")
    load_policy(resolve_policy(cfg.policy, 3))
    weights = resolve_weights(cfg.weights, cfg.model, cfg.download_weights)
    if weights is not None and not weights.is_file():
        raise UserError(f"pretrained weights not found: {cfg.weights} (a local file, or imagenet)")
    resolve_device(cfg.device)


def resolved_config(cfg: TrainConfig, dataset: Dataset) -> TrainConfig:
    """`cfg` with what it leaves to the data (model, batch size, learning rate, policy: cnn.model.recipe) decided
    for this dataset's image size, channels and training images."""
    meta = dataset.meta()
    train_images = len(dataset.usable("train", distinct=True))
    return recipe.resolve_recipe(cfg, meta.image_size, meta.channels, train_images)


def fit(
    cfg: TrainConfig,
    dataset_root: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
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


def _build_parts(cfg: TrainConfig, setup: _Setup, device: torch.device, precision: PrecisionChoice) -> _Parts:
    weights = resolve_weights(cfg.weights, cfg.model, cfg.download_weights)
    model = create_model(cfg.model, len(setup.classes), setup.contract.channels, weights, **cfg.model_options)
    _check_input_size(model, cfg.model, setup.contract)
    amp_dtype, scaler = training_amp(device, precision)
    model = model.to(device).to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    rt = Runtime(
        device,
        torch.tensor(setup.contract.mean, device=device),
        torch.tensor(setup.contract.std, device=device),
        cfg.channels_last,
        amp_dtype,
        scaler,
    )
    optimizer = build_optimizer(cfg, model, device)
    scheduler = build_scheduler(cfg, optimizer, len(setup.train_loader))
    loss_fn = nn.CrossEntropyLoss(
        weight=None if setup.loss_weight is None else setup.loss_weight.to(device), label_smoothing=cfg.label_smoothing
    )
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    return _Parts(model, model, optimizer, scheduler, loss_fn, rt, average)


def _wrap_for_steps(parts: _Parts, cfg: TrainConfig, dist: Dist, device: torch.device) -> None:
    compiled = torch.compile(parts.model) if cfg.compile else parts.model
    step_model: nn.Module = compiled  # type: ignore[assignment]  # torch.compile returns a callable module
    if dist.enabled:  # torch.compile returns a callable module; DDP wraps whichever we have
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    parts.step_model = step_model


def _fit(
    cfg: TrainConfig,
    dataset: Dataset,
    run_dir: Path,
    resume: bool,
    on_epoch: Callable[[EpochRecord], None] | None,
    dist: Dist,
    device: torch.device,
) -> FitResult:
    started = time.monotonic()
    cfg = resolved_config(cfg, dataset)
    seed_everything(cfg.seed)
    setup = _Setup(cfg, dataset, dist)
    last = RunFolder(run_dir).checkpoint
    resuming = resume and last.is_file()
    precision = _training_precision(cfg, setup.contract, device, last if resuming else None)
    parts = _build_parts(cfg, setup, device, precision)
    state = TrainState.from_checkpoint(last, cfg, parts) if resuming else TrainState()
    state.precision = precision.name
    _wrap_for_steps(parts, cfg, dist, device)
    budget = _budget(cfg, setup, parts, dist, state, started)
    # Under DDP the ranks would plan apart: there the budget only cuts the run short, between epochs.
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes and budget is None else None
    stopped: Stopped = "completed"
    epoch = state.epoch
    while epoch < (budget.epochs if budget is not None else cfg.epochs):
        epoch_start = time.perf_counter()
        seconds, stats = _run_epoch(parts, setup, cfg, dist, epoch, deadline, budget)
        train_loss, seen = dist.mean(stats.loss_sum, stats.images)
        if dist.main:
            record = end_of_epoch(parts, setup, state, cfg, epoch, train_loss, stats.steps, seen, seconds)
            save_checkpoint(parts, setup, state, cfg, run_dir, epoch)
            if budget is not None:
                budget.after_epoch(seconds, stats.steps, time.perf_counter() - epoch_start)
            if on_epoch is not None:
                on_epoch(record)
            stopped = _stop_reason(cfg, state, stats.out_of_time, budget)
        if dist.broadcast(stopped != "completed"):  # every rank leaves the loop together
            break
        epoch += 1
    return FitResult(
        run_dir,
        RunFolder(run_dir).weights,
        setup.contract,
        state.best_epoch,
        state.best_score,
        state.epoch,
        stopped,
        state.history,
        str(device),
        dist.world,
        precision.name,
        precision.describe(),
        None if budget is None else budget.report(),
    )


def _training_precision(
    cfg: TrainConfig, contract: ModelContract, device: torch.device, resumed: Path | None
) -> PrecisionChoice:
    """The policy's choice for this run; a resumed run keeps the precision its checkpoint was trained in."""
    if resumed is not None:
        saved = torch.load(resumed, map_location="cpu", weights_only=True, mmap=True).get("precision", "fp32")
        return PrecisionChoice(saved, "kept from the resumed checkpoint")
    return choose_training_precision(
        cfg.precision, device, cfg.amp, lambda: bf16_training_speedup(cfg, contract, device)
    )


def bf16_training_speedup(cfg: TrainConfig, contract: ModelContract, device: torch.device, rounds: int = 3) -> float:
    """bf16 autocast training steps' speed over fp32's for the run's model and input size on this host: the median
    of `rounds` interleaved timings of two forward+backward steps on a random batch of up to 32 images, after a
    warm-up step each. The random numbers come from a forked generator: the run's own stay untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(cfg.model, len(contract.classes), contract.channels, None, **cfg.model_options)
        memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(device).to(memory_format=memory).train()
        n, size = min(cfg.batch, 32), contract.image_size
        x = torch.randn(n, contract.channels, size, size, device=device).contiguous(memory_format=memory)
        y = torch.randint(0, len(contract.classes), (n,), device=device)

        def step(dtype: torch.dtype | None) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
            model.zero_grad(set_to_none=True)

        def two_steps(dtype: torch.dtype | None) -> Callable[[], None]:
            def run() -> None:
                step(dtype)
                step(dtype)

            return run

        for dtype in (None, torch.bfloat16):  # warm-up
            step(dtype)
        return interleaved_speedups(two_steps(None), [two_steps(torch.bfloat16)], rounds)[0]


def _budget(
    cfg: TrainConfig, setup: _Setup, parts: _Parts, dist: Dist, state: TrainState, started: float
) -> Budget | None:
    """The plan of a --max-minutes run, driving the schedule's end (None without a budget, and under DDP). A resumed
    run plans what is left of its schedule again within a fresh budget."""
    if not cfg.max_minutes or dist.enabled or not isinstance(parts.scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    schedule = parts.scheduler.lr_lambdas[0]
    assert isinstance(schedule, Schedule)  # build_scheduler's under a budget
    spe = max(1, len(setup.train_loader))
    seconds, val = cfg.max_minutes * 60, len(setup.val.slots)
    return Budget(seconds, spe, val, cfg.batch, schedule, steps=state.epoch * spe, start=started)


def _run_epoch(
    parts: _Parts,
    setup: _Setup,
    cfg: TrainConfig,
    dist: Dist,
    epoch: int,
    deadline: float | None,
    budget: Budget | None,
) -> tuple[float, EpochStats]:
    """Prepare the epoch (freezing, sampler epoch, augmentation seed) and train it; (seconds, stats)."""
    if not dist.enabled:
        freeze_backbone(parts.model, cfg.model, frozen=epoch < cfg.freeze_epochs)
    if setup.sampler is not None:
        setup.sampler.set_epoch(epoch)
    setup.train_data.reseed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    start = time.perf_counter()
    # Under DDP every rank must run the same steps: the time budget is checked between epochs only.
    stats = train_one_epoch(parts, setup.train_loader, cfg.grad_clip, epoch, None if dist.enabled else deadline, budget)
    if parts.average is not None and parts.average.steps:  # the epoch's last steps count in what is validated
        parts.average.update(parts.model)
    if dist.enabled and deadline is not None:
        stats = EpochStats(stats.loss_sum, stats.images, stats.steps, dist.any(time.monotonic() > deadline))
    return time.perf_counter() - start, stats


def end_of_epoch(
    parts: _Parts,
    setup: _Setup,
    state: TrainState,
    cfg: TrainConfig,
    epoch: int,
    train_loss: float,
    steps: int,
    images: int,
    seconds: float,
) -> EpochRecord:
    """Validate, record the epoch and update the best epoch and the patience counter (rank 0)."""
    val = evaluate(parts.kept, setup.val_loader, parts.rt, setup.classes) if len(setup.val.slots) else None
    record = EpochRecord(
        epoch=epoch + 1,
        train_loss=train_loss,
        lr=parts.optimizer.param_groups[0]["lr"],
        steps=steps,
        epoch_seconds=seconds,
        train_images_per_s=images / max(seconds, 1e-9),
        val=val.headline() if val is not None else {},
    )
    score = None if val is None else val.score(cfg.monitor)
    improved = state.best_score is None or (score is not None and score > state.best_score)
    if improved or val is None:
        state.best_epoch, state.best_score, state.stale = epoch + 1, score, 0
    else:
        state.stale += 1
    state.epoch = epoch + 1
    state.history.append(record)
    return record


def save_checkpoint(
    parts: _Parts, setup: _Setup, state: TrainState, cfg: TrainConfig, run_dir: Path, epoch: int
) -> None:
    """best.pt when this epoch is the best so far, last.pt always, and the contract and config once (rank 0)."""
    folder = RunFolder(run_dir)
    if state.best_epoch == epoch + 1:
        _save(parts.kept.state_dict(), folder.weights)
    _save(state.to_checkpoint(parts, cfg), folder.checkpoint)
    if epoch == 0 or not folder.contract.is_file():
        setup.contract.save(folder.contract)
        write_text_atomic(folder.config, cfg.to_yaml())


def _stop_reason(cfg: TrainConfig, state: TrainState, out_of_time: bool, budget: Budget | None) -> Stopped:
    if out_of_time:
        return "time_budget"
    if budget is not None:  # the plan decides the end: stopping early would leave the schedule half run
        return "completed"
    if cfg.patience and state.stale >= cfg.patience:
        return "early_stopping"
    return "completed"


def _save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_input_size(model: nn.Module, name: str, contract: ModelContract) -> None:
    """Fail early, with the reason, when the network cannot take the dataset's image size."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, contract.channels, contract.image_size, contract.image_size))
    except RuntimeError as exc:
        raise UserError(
            f"model {name} with these options cannot take {contract.image_size}x{contract.image_size} "
            f"images ({exc}); use larger images, fewer layers, or stride 1"
        ) from None
    finally:
        model.train(was_training)

"""Training one cell: the paper's protocol, resumable from per-epoch checkpoints.

Every epoch's randomness (shuffle, augmentation, dropout) is seeded from (seed, epoch), so a run
resumed from the checkpoint of epoch k ends with exactly the metrics of an uninterrupted run.
The loop knows nothing of MLflow or Optuna: it reports to a tracker object.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import augment_batch, to_float
from .config import AugmentConfig, ExperimentConfig, ModelConfig
from .data import Dataset, Split
from .errors import ChaeError
from .model import build_model, count_parameters, forward_flops

EVAL_BATCH = 256


class Tracker(Protocol):
    def restore(self, history: list[dict[str, float]]) -> None: ...
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


class NullTracker:
    """Logs nothing: for tests and dry runs."""

    def restore(self, history: list[dict[str, float]]) -> None:
        pass

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass


class CellFailed(ChaeError):
    """The cell cannot finish (e.g. a non-finite loss); the study goes on."""


@dataclass
class CellResult:
    best_val_loss: float
    best_epoch: int
    val_acc_at_best: float
    test_loss: float
    test_acc: float
    n_params: int
    mflops: float
    images_per_s: float
    wall_time_s: float
    history: list[dict[str, float]]
    resumed_from: int  # epochs restored from a checkpoint (0 = fresh start)

    def summary(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items() if k not in ("history", "resumed_from")}


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; or the one asked for, if it exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChaeError(f"--device {name}: no CUDA device is visible here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ChaeError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None


def epoch_plan(n: int, copies: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's 4:1 mix: every image once as is and `copies` times augmented, shuffled together.

    Returns (indices, augment mask), both length n * (copies + 1).
    """
    indices = torch.arange(n).repeat(copies + 1)
    augment = torch.arange(n * (copies + 1)) >= n
    order = torch.randperm(len(indices), generator=generator)
    return indices[order], augment[order]


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


def make_optimizer(config: ExperimentConfig, params) -> torch.optim.Optimizer:
    p = config.protocol
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=0.9, weight_decay=p.weight_decay)
    optimizer = torch.optim.AdamW if p.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=p.lr, weight_decay=p.weight_decay)


class Batches:
    """A split resident on the training device, served as float batches."""

    def __init__(self, split: Split, device: torch.device):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)


def evaluate(model: torch.nn.Module, batches: Batches, autocast) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split, without augmentation."""
    model.eval()
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device)
    with torch.no_grad():
        for start in range(0, len(batches), EVAL_BATCH):
            x = to_float(batches.images[start:start + EVAL_BATCH])
            y = batches.labels[start:start + EVAL_BATCH]
            with autocast():
                logits = model(_memory_format(x))
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    n = max(len(batches), 1)
    return loss_sum.item() / n, correct.item() / n


def _memory_format(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def setup_model(config: ModelConfig, num_classes: int, device: torch.device, seed: int) -> torch.nn.Module:
    """The seeded model on its device in channels_last (1.1-1.4x faster on CPU too:
    benchmarks/ceiling.py)."""
    torch.manual_seed(seed)
    return build_model(config, num_classes).to(device).to(memory_format=torch.channels_last)


def train_cell(config: ExperimentConfig, seed: int, data: Dataset, device: torch.device,
               checkpoint_dir: Path | None = None, tracker: Tracker | None = None,
               progress: bool = False, label: str = "", compile_model: bool = False) -> CellResult:
    """Train one cell to the protocol; keep the best-validation checkpoint; test it."""
    tracker = tracker or NullTracker()
    p = config.protocol
    num_classes = len(data.classes)
    model = setup_model(config.model, num_classes, device, seed)
    optimizer = make_optimizer(config, model.parameters())
    autocast = autocast_for(device)
    state = _load_checkpoint(checkpoint_dir, model, optimizer, device)
    tracker.restore(state["history"])
    step_model = torch.compile(model) if compile_model else model
    train, val = Batches(data.train, device), Batches(data.val, device)
    started = time.perf_counter()
    for epoch in range(len(state["history"]) + 1, p.epochs + 1):
        train_loss, train_acc, images_per_s = _train_epoch(
            step_model, optimizer, train, config, seed, epoch, autocast, progress, label)
        val_loss, val_acc = evaluate(step_model, val, autocast)
        metrics = {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                   "val_acc": val_acc, "images_per_s": images_per_s}
        if not all(math.isfinite(v) for v in metrics.values()):
            raise CellFailed(f"non-finite loss at epoch {epoch} (train {train_loss}, val {val_loss})")
        state["history"].append(metrics)
        if val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_epoch=epoch, val_acc_at_best=val_acc,
                         best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
        state["wall_time_s"] += time.perf_counter() - started
        started = time.perf_counter()
        _save_checkpoint(checkpoint_dir, model, optimizer, state)
        tracker.log_epoch(epoch, {k: v for k, v in metrics.items() if k != "images_per_s"})
    if state["best_state"] is None:
        raise CellFailed("no epoch finished (protocol.epochs is 0?)")
    model.load_state_dict(state["best_state"])
    test_loss, test_acc = evaluate(model, Batches(data.test, device), autocast)
    state["wall_time_s"] += time.perf_counter() - started
    speeds = sorted(h["images_per_s"] for h in state["history"])
    return CellResult(
        best_val_loss=state["best_val_loss"], best_epoch=state["best_epoch"],
        val_acc_at_best=state["val_acc_at_best"], test_loss=test_loss, test_acc=test_acc,
        n_params=count_parameters(model), mflops=forward_flops(config.model, num_classes) / 1e6,
        images_per_s=speeds[len(speeds) // 2], wall_time_s=state["wall_time_s"],
        history=state["history"], resumed_from=state["resumed_from"])


def _train_epoch(model, optimizer, train: Batches, config: ExperimentConfig, seed: int, epoch: int,
                 autocast, progress: bool, label: str) -> tuple[float, float, float]:
    """One epoch of the k:1 augmented mix; returns (loss, accuracy, images/s)."""
    p, aug = config.protocol, config.data.augment
    torch.manual_seed(_epoch_seed(seed, epoch, 0))  # dropout
    shuffle = torch.Generator().manual_seed(_epoch_seed(seed, epoch, 1))
    augment_rng = torch.Generator(device=train.device).manual_seed(_epoch_seed(seed, epoch, 2))
    indices, augmented = epoch_plan(len(train), aug.copies, shuffle)
    model.train()
    loss_sum = torch.zeros((), device=train.device)
    correct = torch.zeros((), device=train.device)
    steps = range(0, len(indices), p.batch_size)
    bar = tqdm(steps, desc=f"{label} epoch {epoch}/{p.epochs}", leave=False, disable=not progress,
               unit="batch", dynamic_ncols=True)
    start = time.perf_counter()
    for i, offset in enumerate(bar):
        x, y = mixed_batch(train, indices[offset:offset + p.batch_size],
                           augmented[offset:offset + p.batch_size], aug, augment_rng)
        loss, logits = train_step(model, optimizer, x, y, autocast)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / (offset + len(y)):.3f}")
    n = len(indices)
    loss_value, acc = loss_sum.item() / n, correct.item() / n  # the epoch's only host syncs
    return loss_value, acc, n / (time.perf_counter() - start)


def mixed_batch(train: Batches, indices: torch.Tensor, augmented: torch.Tensor, aug: AugmentConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the k:1 mix as (float images, labels) on the training device.

    `indices` and `augmented` are host slices of `epoch_plan`'s output; the rows marked augmented
    get a fresh random transform from `generator`, the others are the cached pixels as they are.
    """
    idx = indices.to(train.device, non_blocking=True)
    rows = augmented.nonzero().squeeze(1)  # on the host: no sync
    x = to_float(train.images[idx])
    if len(rows):
        rows = rows.to(train.device, non_blocking=True)
        x[rows] = augment_batch(train.images[idx[rows]], aug, generator)
    return x, train.labels[idx]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step (forward, cross-entropy, backward, update); returns the detached
    (loss, logits) without a host sync."""
    with autocast():
        logits = model(_memory_format(x))
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def _fresh_state() -> dict:
    return {"history": [], "best_val_loss": math.inf, "best_epoch": 0, "val_acc_at_best": 0.0,
            "best_state": None, "wall_time_s": 0.0, "resumed_from": 0}


def _load_checkpoint(directory: Path | None, model, optimizer, device) -> dict:
    path = directory / "last.pt" if directory else None
    if path is None or not path.exists():
        return _fresh_state()
    saved = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state = saved["state"]
    state["resumed_from"] = len(state["history"])
    return state


def _save_checkpoint(directory: Path | None, model, optimizer, state: dict) -> None:
    """Atomic: a kill at any moment leaves the previous or the new checkpoint, never half of one."""
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"last.pt.{os.getpid()}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, tmp)
    os.replace(tmp, directory / "last.pt")

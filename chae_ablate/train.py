"""Training one cell: the paper's protocol, resumable from per-epoch checkpoints.

Every epoch's randomness (shuffle, augmentation, dropout) is seeded from (seed, epoch), so a run
resumed from the checkpoint of epoch k ends with exactly the metrics of an uninterrupted run.
The loop knows nothing of MLflow or Optuna: it reports to a tracker object. This module alone
reads and writes checkpoints: tensors and plain data only, loaded with weights_only=True, so a
planted checkpoint cannot run code; one that does not load is moved aside and the cell restarts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import to_float
from .config import OPTIMIZERS, ExperimentConfig, ModelConfig, OtherModel
from .data import Dataset
from .errors import ChaeError
from .files import atomic_write
from .metrics import CellResult, EpochMetrics, Metric
from .builders import build, count_parameters, forward_flops
from .stream import DROPOUT, DeviceSplit, TrainingStream, epoch_seed

EVAL_BATCH = 256
CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = 2  # 2: tensors and plain data only (weights_only=True)


class Tracker(Protocol):
    def log_missed_epochs(self, history: list[dict[str, float]]) -> None: ...
    def confirm_held(self) -> None: ...  # raises when this worker may no longer write the cell (taken over)
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


class NullTracker:
    """Logs nothing: for tests and dry runs."""

    def confirm_held(self) -> None:
        pass

    def log_missed_epochs(self, history: list[dict[str, float]]) -> None:
        pass

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass


class CellFailed(ChaeError):
    """The cell cannot finish (e.g. no epoch to train); the study goes on."""


class CheckpointWarning(UserWarning):
    """A checkpoint could not be loaded; it was moved aside and the cell restarted."""


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


def make_optimizer(config: ExperimentConfig, params) -> torch.optim.Optimizer:
    p = config.protocol
    return OPTIMIZERS[p.optimizer](params, lr=p.lr, weight_decay=p.weight_decay)


def evaluate(model: torch.nn.Module, split: DeviceSplit, autocast) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split, without augmentation."""
    model.eval()
    loss_sum = torch.zeros((), device=split.device)
    correct = torch.zeros((), device=split.device)
    with torch.no_grad():
        for start in range(0, len(split), EVAL_BATCH):
            x = to_float(split.images[start:start + EVAL_BATCH])
            y = split.labels[start:start + EVAL_BATCH]
            with autocast():
                logits = model(_memory_format(x))
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    n = max(len(split), 1)
    return loss_sum.item() / n, correct.item() / n


def _memory_format(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def setup_model(config: ModelConfig | OtherModel, num_classes: int, device: torch.device, seed: int) -> torch.nn.Module:
    """The seeded model on its device in channels_last (1.1-1.4x faster on CPU too:
    benchmarks/ceiling.py)."""
    torch.manual_seed(seed)
    return build(config, num_classes).to(device).to(memory_format=torch.channels_last)


def train_cell(*, config: ExperimentConfig, seed: int, data: Dataset, device: torch.device,
               checkpoint_dir: Path | None = None, tracker: Tracker | None = None,
               progress: bool = False, label: str = "", compile_model: bool = False) -> CellResult:
    """Train one cell to the protocol; keep the best-validation checkpoint; test it. An epoch whose
    metrics are non-finite ends training there, as a result (diverged_epoch): the best of the epochs
    before it is tested, or, when it was the first, the cell scores the worst there is."""
    tracker = tracker or NullTracker()
    p = config.protocol
    num_classes = len(data.classes)
    model = setup_model(config.model, num_classes, device, seed)
    optimizer = make_optimizer(config, model.parameters())
    autocast = autocast_for(device)
    state = load_checkpoint(checkpoint_dir, model, optimizer, device)
    tracker.log_missed_epochs(state["history"])
    step_model = torch.compile(model) if compile_model else model
    stream = TrainingStream(DeviceSplit(data.train, device), p.augment, p.batch_size)
    val = DeviceSplit(data.val, device)
    started, diverged_epoch = time.perf_counter(), None
    for epoch in range(len(state["history"]) + 1, p.epochs + 1):
        train_loss, train_acc, images_per_s = _train_epoch(
            step_model, optimizer, stream, seed, epoch, autocast, _bar(progress, label, epoch, p.epochs, stream))
        val_loss, val_acc = evaluate(step_model, val, autocast)
        metrics = dataclasses.asdict(EpochMetrics(train_loss, train_acc, val_loss, val_acc))
        if not all(math.isfinite(v) for v in metrics.values()):
            diverged_epoch = epoch  # neither logged nor checkpointed: the checkpoint keeps the epochs before
            break
        state["history"].append({**metrics, Metric.IMAGES_PER_S: images_per_s})
        if val_loss < state[Metric.BEST_VAL_LOSS]:
            state.update({Metric.BEST_VAL_LOSS: val_loss, Metric.BEST_EPOCH: epoch, Metric.VAL_ACC_AT_BEST: val_acc,
                          "best_state": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        state[Metric.WALL_TIME_S] += time.perf_counter() - started
        started = time.perf_counter()
        tracker.confirm_held()  # a cell another worker took over is its checkpoint no longer ours to write
        _save_checkpoint(checkpoint_dir, model, optimizer, state)
        tracker.log_epoch(epoch, metrics)
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
        test_loss, test_acc = evaluate(model, DeviceSplit(data.test, device), autocast)
    elif diverged_epoch is not None:
        test_loss, test_acc = math.inf, 0.0  # diverged at epoch 1: the worst, as the fresh best_* are
    else:
        raise CellFailed("no epoch finished (protocol.epochs is 0?)")
    state[Metric.WALL_TIME_S] += time.perf_counter() - started
    speeds = sorted(h[Metric.IMAGES_PER_S] for h in state["history"])
    return CellResult(
        best_val_loss=state[Metric.BEST_VAL_LOSS], best_epoch=state[Metric.BEST_EPOCH],
        val_acc_at_best=state[Metric.VAL_ACC_AT_BEST], test_loss=test_loss, test_acc=test_acc,
        n_params=count_parameters(model), mflops=forward_flops(config.model, num_classes) / 1e6,
        images_per_s=speeds[len(speeds) // 2] if speeds else math.nan, wall_time_s=state[Metric.WALL_TIME_S],
        history=state["history"], resumed_from=state["resumed_from"], diverged_epoch=diverged_epoch)


def _bar(enabled: bool, label: str, epoch: int, epochs: int, stream: TrainingStream):
    return tqdm(total=stream.batches_per_epoch(), desc=f"{label} epoch {epoch}/{epochs}", leave=False,
                disable=not enabled, unit="batch", dynamic_ncols=True)


def _train_epoch(model, optimizer, stream: TrainingStream, seed: int, epoch: int, autocast,
                 bar) -> tuple[float, float, float]:
    """One epoch of the k:1 augmented mix; returns (loss, accuracy, images/s)."""
    torch.manual_seed(epoch_seed(seed, epoch, DROPOUT))
    model.train()
    device = stream.split.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, start = 0, time.perf_counter()
    with bar:
        for i, (x, y) in enumerate(stream.epoch(seed, epoch)):
            loss, logits = train_step(model, optimizer, x, y, autocast)
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            bar.update()
            if not bar.disable and i % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
    loss_value, acc = loss_sum.item() / seen, correct.item() / seen  # the epoch's only host syncs
    return loss_value, acc, seen / (time.perf_counter() - start)


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


# --- checkpoints: written and read only here ---------------------------------------------------

def _fresh_state() -> dict:
    return {"history": [], Metric.BEST_VAL_LOSS: math.inf, Metric.BEST_EPOCH: 0, Metric.VAL_ACC_AT_BEST: 0.0,
            "best_state": None, Metric.WALL_TIME_S: 0.0, "resumed_from": 0}


def _read(path: Path, device) -> dict:
    """A checkpoint's contents; raises on anything that is not a readable checkpoint."""
    saved = torch.load(path, map_location=device, weights_only=True)  # never unpickles code
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise ValueError("not a chae-ablate checkpoint")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {saved.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    history = saved["state"].get("history")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("its history is not a list of epochs")
    return saved


def checkpoint_epochs(directory: Path) -> int:
    """Epochs a cell's checkpoint holds (0 when there is none or it does not load)."""
    path = directory / CHECKPOINT
    try:
        return len(_read(path, "cpu")["state"]["history"]) if path.exists() else 0
    except Exception:  # a bad checkpoint is moved aside by load_checkpoint when the cell starts
        return 0


def load_checkpoint(directory: Path | None, model, optimizer, device) -> dict:
    """Restore model and optimizer from the cell's checkpoint and return the training state; a
    missing checkpoint is a fresh start, an unloadable one is moved aside with a warning."""
    path = directory / CHECKPOINT if directory else None
    if path is None or not path.exists():
        return _fresh_state()
    initial = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(optimizer.state_dict()))
    try:
        saved = _read(path, device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    except Exception as err:  # corrupt, truncated, planted or from an incompatible model
        aside = path.with_name(f"{CHECKPOINT}.unloadable-{time.strftime('%Y%m%d-%H%M%S')}")
        path.replace(aside)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        warnings.warn(f"checkpoint {path} does not load ({reason}); moved to {aside.name}, "
                      "the cell restarts from epoch 1", CheckpointWarning, stacklevel=2)
        model.load_state_dict(initial[0])  # a half-applied load must not leak into the restart
        optimizer.load_state_dict(initial[1])
        return _fresh_state()
    state = saved["state"]
    state["resumed_from"] = len(state["history"])
    return state


def _save_checkpoint(directory: Path | None, model, optimizer, state: dict) -> None:
    """Atomic: a kill at any moment leaves the previous or the new checkpoint, never half of one."""
    if directory is None:
        return
    saved = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "state": state}
    atomic_write(directory / CHECKPOINT, lambda f: torch.save(saved, f))


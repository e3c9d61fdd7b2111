"""Splits for ablation studies: every cell sees the same images in the same train / val / test splits.

`load_dataset` turns a DataConfig into uint8 tensors at the study resolution: it loads the whole
source through its entry in `sources.SOURCES` (folder, digits or synthetic; decoded once), splits it
and writes the split manifest.

Splits are stratified per class and seeded by `split_seed`: within a class, items are ordered by a
seeded hash of their id and cut by per-class rounding, so each class's count in a split is within one
image of (class size x split fraction), and adding a file to one class moves no other class's items.
The split is written as a manifest CSV (file, class, split, sha256) under runs/splits/. Files that
cannot be read are skipped with a DataWarning and listed there, never fatal.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .files import atomic_write
from .sources import SOURCES, DataWarning, Items

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, 3, R, R), on CPU
    labels: torch.Tensor  # int64 (N,)


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    manifest: Path  # the split manifest CSV
    fingerprint: str  # identifies the source data
    skipped: tuple[str, ...]  # files that could not be read (relative to the root)
    decoded: int = 0  # image files decoded by this load call (0 on a cache hit)


def load_dataset(cfg: DataConfig, resolution: int, runs_dir: Path = Path("runs"),
                 progress: bool = True) -> Dataset:
    """Load `cfg`'s images at `resolution` px, split train / val / test, write the split manifest."""
    source = SOURCES.get(cfg.source)
    if source is None:
        raise DataError(f"data.source: {cfg.source!r} is not one of {', '.join(SOURCES)}")
    items = source.items(cfg, resolution, Path(runs_dir) / "cache", progress)
    readable = np.array([not e for e in items.errors], dtype=bool)
    split = assign_splits(items.ids, items.labels, readable, cfg)
    manifest = write_manifest(items, split, cfg, Path(runs_dir) / "splits")
    skipped = tuple(i for i, e in zip(items.ids, items.errors) if e)
    if skipped:
        reasons = [f"{i} ({e})" for i, e in zip(items.ids, items.errors) if e]
        more = f"; and {len(reasons) - 20} more" if len(reasons) > 20 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable file(s), all listed in {manifest}: "
                      f"{'; '.join(reasons[:20])}{more}", DataWarning, stacklevel=2)
    labels = torch.from_numpy(items.labels[readable])
    parts = [_subset(items.images, labels, split[readable] == s) for s in range(len(SPLITS))]
    return Dataset(*parts, classes=items.classes, manifest=manifest, fingerprint=items.fingerprint,
                   skipped=skipped, decoded=items.decoded)


def _subset(images: torch.Tensor, labels: torch.Tensor, mask: np.ndarray) -> Split:
    index = torch.from_numpy(np.flatnonzero(mask))
    return Split(images[index], labels[index])  # (index_select is many times slower on uint8 here)


# --- splits and manifest ----------------------------------------------------------------------

def assign_splits(ids: list[str], labels: np.ndarray, readable: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Split index per item (0 train, 1 val, 2 test, -1 unreadable), stratified and seeded.

    Per class of n readable items: round(n x test_fraction) go to test, then
    round(rest x val_fraction) to val, the others to train; which ones is decided by a seeded hash of
    each item's id, so the result depends only on the ids, labels and seed.
    """
    split = np.full(len(ids), -1, dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero((labels == label) & readable)
        order = sorted(members, key=lambda i: hashlib.sha256(f"{cfg.split_seed}/{ids[i]}".encode()).digest())
        n_test = _round(len(order) * cfg.test_fraction)
        n_val = _round((len(order) - n_test) * cfg.val_fraction)
        split[order[:n_test]] = 2
        split[order[n_test:n_test + n_val]] = 1
        split[order[n_test + n_val:]] = 0
    for index, name in enumerate(SPLITS):
        if readable.any() and not (split == index).any():
            fix = "lower data.test_fraction or data.val_fraction" if name == "train" else f"raise data.{name}_fraction"
            raise DataError(f"the {name} split is empty ({int(readable.sum())} images, test_fraction "
                            f"{cfg.test_fraction}, val_fraction {cfg.val_fraction}); add images or {fix}")
    return split


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, unlike Python's round-half-even


def write_manifest(items: Items, split: np.ndarray, cfg: DataConfig, directory: Path) -> Path:
    """Write (or keep, when identical) the split manifest CSV and return its path."""
    key = hashlib.sha256(f"{items.fingerprint}|{cfg.split_seed}|{cfg.test_fraction}|{cfg.val_fraction}".encode())
    path = directory / f"{items.name}-{key.hexdigest()[:16]}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "class", "split", "sha256"])
    for item_id, label, s, sha in zip(items.ids, items.labels, split, items.hashes):
        writer.writerow([item_id, items.classes[label], SPLITS[s] if s >= 0 else "skipped", sha])
    data = buffer.getvalue().encode()
    if not (path.exists() and path.read_bytes() == data):
        atomic_write(path, lambda f: f.write(data))
    return path


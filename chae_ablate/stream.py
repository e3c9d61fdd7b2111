"""The training stream: the paper's k:1 augmented mix of the training split, batch by batch.

In the spirit of airbench's loader: the split is decoded once and resident on the training device
as uint8; `for x, y in stream.epoch(seed, epoch)` shuffles every image once as it is plus `copies`
augmented copies, gathers each batch on the device and augments its marked rows there, with no
Python loop over images and no host sync. Every epoch's randomness is seeded from (seed, epoch), so
a cell resumed at epoch k sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .augment import augment_batch, to_float
from .config import AugmentConfig
from .data import Split

DROPOUT, SHUFFLE, AUGMENT = 0, 1, 2  # the independent random streams of one epoch


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """The seed of one random stream (DROPOUT, SHUFFLE or AUGMENT) of one epoch of one cell."""
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


class DeviceSplit:
    """A split's uint8 images and labels, moved once to the device they are used on."""

    def __init__(self, split: Split, device: torch.device):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)


def epoch_order(n: int, copies: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's 4:1 mix: every image once as is and `copies` times augmented, shuffled together.

    Returns (indices, augment mask), both length n * (copies + 1), on the host.
    """
    indices = torch.arange(n).repeat(copies + 1)
    augment = torch.arange(n * (copies + 1)) >= n
    order = torch.randperm(len(indices), generator=generator)
    return indices[order], augment[order]


class TrainingStream:
    """The training split served as the epoch's k:1 mix of plain and augmented batches."""

    def __init__(self, split: DeviceSplit, augment: AugmentConfig, batch_size: int):
        self.split, self.augment, self.batch_size = split, augment, batch_size

    def __len__(self) -> int:
        """Images per epoch."""
        return len(self.split) * (self.augment.copies + 1)

    def batches_per_epoch(self) -> int:
        return -(-len(self) // self.batch_size)

    def epoch(self, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float images in [0, 1], labels) batches of one epoch, on the split's device."""
        shuffle = torch.Generator().manual_seed(epoch_seed(seed, epoch, SHUFFLE))
        rng = torch.Generator(device=self.split.device).manual_seed(epoch_seed(seed, epoch, AUGMENT))
        indices, augmented = epoch_order(len(self.split), self.augment.copies, shuffle)
        for offset in range(0, len(indices), self.batch_size):
            rows = slice(offset, offset + self.batch_size)
            yield self.batch(indices[rows], augmented[rows], rng)

    def batch(self, indices: torch.Tensor, augmented: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: the images at host `indices`, those marked `augmented` given a fresh random
        transform from `generator` (on the device), the others as they are."""
        idx = indices.to(self.split.device, non_blocking=True)
        rows = augmented.nonzero().squeeze(1)  # on the host: no sync
        x = to_float(self.split.images[idx])
        if len(rows):
            rows = rows.to(self.split.device, non_blocking=True)
            x[rows] = augment_batch(self.split.images[idx[rows]], self.augment, generator)
        return x, self.split.labels[idx]

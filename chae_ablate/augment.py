"""Keras-style random augmentation of whole image batches on their own device.

The CHAE paper trained with Keras' ImageDataGenerator(rotation_range=30, shear_range=0.2,
zoom_range=0.2, horizontal_flip=True, fill_mode='nearest'). This module reproduces that transform
for a whole batch at once, one affine_grid + grid_sample call with per-sample parameters drawn from
a torch.Generator, so it runs on the GPU every training step without a Python loop over samples.

What Keras >= 2.9 and Keras 3's legacy ImageDataGenerator do (keras-team/keras
keras/src/legacy/preprocessing/image.py at v3.3.3, commit f6c4ac5: get_random_transform l. 1294,
apply_transform l. 1385, transform_matrix_offset_center l. 1769, apply_affine_transform l. 1779;
the same code in keras/preprocessing/image.py from v2.9.0 and on master 3422977), channels_last:
- theta ~ U(-rotation_range, rotation_range) degrees, shear ~ U(-shear_range, shear_range), both
  converted with np.deg2rad: shear_range is in DEGREES, so the paper's 0.2 is a barely visible
  0.2 degree shear (kept as configured, not "fixed"); zx, zy ~ U(zoom_low, zoom_high) independently;
- matrix = rotation @ shear @ zoom in (x, y) = (column, row) coordinates, output -> sampled input:
    input_col - cx = zx cos(theta) dx - zy sin(theta + shear) dy
    input_row - cy = zx sin(theta) dx + zy cos(theta + shear) dy,   dx = col - cx, dy = row - cy,
  so positive theta turns the content counter-clockwise as displayed, the shear moves each row
  sideways, zx scales columns, and zx, zy > 1 sample a wider area: they zoom OUT;
- the pivot is (cx, cy) = (H/2 - 0.5, W/2 - 0.5): the centre for square images, but for
  non-square ones Keras pairs the column with the height (a quirk reproduced here); no shift;
- horizontal flip with p = 0.5, applied after the affine transform;
- scipy affine_transform, order=1 (bilinear), fill_mode='nearest' (replicate the border pixel).
keras_preprocessing 1.1.2 differed (affine_transformations.py l. 245-336, tag 1.1.2 = 4538765): it
applied the matrix to (row, col) (opposite rotation, shear moving columns up and down, zx on rows)
about (H/2 + 0.5, W/2 + 0.5), a pixel off the centre.
tests/test_augment.py checks the result against a transcription of Keras' functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AugmentConfig


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in 0..255 -> float32 in [0, 1]; float input is taken to be in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One random Keras-style transform per image; (B, 3, H, W) uint8 or float -> float in [0, 1].

    `generator` must live on images.device. With every range at zero (rotation 0, shear 0,
    zoom (1, 1), flip off) the result equals `to_float(images)` to float tolerance.
    """
    x = to_float(images)
    if not len(x):
        return x  # affine_grid refuses an empty batch
    return apply_affine(x, sample_params(x.shape[0], cfg, generator, x.device))


@dataclass(frozen=True)
class AffineParams:
    """Per-sample transform parameters, each a (B,) tensor, in Keras' units."""

    rotation: torch.Tensor  # degrees
    shear: torch.Tensor  # degrees
    zx: torch.Tensor  # zoom factor on columns (Keras' x); > 1 zooms out
    zy: torch.Tensor  # zoom factor on rows (Keras' y)
    flip: torch.Tensor  # bool: mirror left-right after the affine transform (Keras' flip_horizontal)


def sample_params(batch: int, cfg: AugmentConfig, generator: torch.Generator,
                  device: torch.device) -> AffineParams:
    """Draw parameters as Keras' get_random_transform does, for a whole batch at once.

    Five uniforms are drawn per sample whatever the config, so a given generator state yields the
    same rotations whether or not, say, flipping is enabled.
    """
    u = torch.rand(batch, 5, generator=generator, device=device)
    low, high = cfg.zoom
    return AffineParams(rotation=(2 * u[:, 0] - 1) * cfg.rotation, shear=(2 * u[:, 1] - 1) * cfg.shear,
                        zx=low + (high - low) * u[:, 2], zy=low + (high - low) * u[:, 3],
                        flip=(u[:, 4] < 0.5) & cfg.flip)


def apply_affine(x: torch.Tensor, p: AffineParams) -> torch.Tensor:
    """Transform float (B, C, H, W) images with one grid_sample: bilinear, border replicated."""
    theta = affine_theta(p, x.shape[-2], x.shape[-1])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2) sample points
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def affine_theta(p: AffineParams, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) affine_grid matrices: output -> input, normalised (x, y) coordinates.

    Keras' pixel map (module docstring) in align_corners=False units, where a pixel lies n * size / 2
    from the true centre; the last column moves the pivot to Keras' (H/2 - 0.5, W/2 - 0.5), which
    is zero for square images and (width - height) / 2 pixels off on each axis otherwise.
    """
    rot, shear = torch.deg2rad(p.rotation), torch.deg2rad(p.shear)
    a, b = torch.cos(rot) * p.zx, -torch.sin(rot + shear) * p.zy  # input col per output col, row
    c, d = torch.sin(rot) * p.zx, torch.cos(rot + shear) * p.zy  # input row per output col, row
    sign = torch.where(p.flip, -1.0, 1.0)  # a flip after the transform reads output x from -x
    gap = width - height
    return torch.stack([torch.stack([a * sign, b * height / width, (a - b - 1) * gap / width], -1),
                        torch.stack([c * sign * width / height, d, (1 + c - d) * gap / height], -1)], 1)

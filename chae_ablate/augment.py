"""Keras-style random augmentation of whole image batches on their own device.

The CHAE paper trained with Keras' ImageDataGenerator(rotation_range=30, shear_range=0.2,
zoom_range=0.2, horizontal_flip=True, fill_mode='nearest'). This module reproduces that transform
for a whole batch at once, one affine_grid + grid_sample call with per-sample parameters drawn from
a torch.Generator, so it runs on the GPU every training step without a Python loop over samples.

What Keras does (keras_preprocessing/image/affine_transformations.py, `apply_affine_transform`,
and ImageDataGenerator.get_random_transform / apply_transform), checked against its source:
- theta ~ U(-rotation_range, rotation_range) degrees, converted with np.deg2rad;
- shear ~ U(-shear_range, shear_range), also converted with np.deg2rad: shear_range is in DEGREES,
  so the paper's 0.2 is a barely visible 0.2 degree shear (kept as configured, not "fixed");
- zx, zy ~ U(zoom_low, zoom_high) independently. The matrix maps OUTPUT coordinates to the input
  coordinates that are sampled (scipy/tfa convention), so zx > 1 samples a wider area: it zooms OUT;
- matrix = rotation @ shear @ zoom in (row, col) coordinates, about the image centre; no shift;
- horizontal flip with p = 0.5, applied after the affine transform;
- order=1 (bilinear) interpolation, fill_mode='nearest' (replicate the border pixel).
tests/test_augment.py checks the result against a scipy re-implementation of that function.
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
    zx: torch.Tensor  # zoom factor on Keras' first image axis (rows); > 1 zooms out
    zy: torch.Tensor  # zoom factor on the second axis (columns)
    flip: torch.Tensor  # bool: mirror left-right after the affine transform


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
    """(B, 2, 3) affine_grid matrices: output -> input, normalised (x, y) coordinates."""
    rot, shear = torch.deg2rad(p.rotation), torch.deg2rad(p.shear)
    # Keras' rotation @ shear @ zoom in (row, col) coordinates, multiplied out:
    #   [[cos(rot) zx, -sin(rot + shear) zy], [sin(rot) zx, cos(rot + shear) zy]].
    # affine_grid wants (x, y) = (col, row), so rows and columns swap; the centre is the same
    # ((size - 1) / 2 in pixels, 0 in align_corners=False coordinates).
    theta = torch.zeros(rot.shape[0], 2, 3, device=rot.device)
    theta[:, 0, 0] = torch.cos(rot + shear) * p.zy
    theta[:, 0, 1] = torch.sin(rot) * p.zx * (height / width)  # pixel -> normalised units
    theta[:, 1, 0] = -torch.sin(rot + shear) * p.zy * (width / height)
    theta[:, 1, 1] = torch.cos(rot) * p.zx
    # A flip after the transform reads output column x from -x: negate the x input column.
    theta[:, :, 0] *= torch.where(p.flip, -1.0, 1.0).unsqueeze(1)
    return theta

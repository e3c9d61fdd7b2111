"""Batch augmentation: identity at zero ranges, Keras' geometry, flips, range and border fill."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from chae_ablate.augment import apply_affine, augment_batch, sample_params, to_float
from chae_ablate.config import AugmentConfig

OFF = AugmentConfig(rotation=0.0, shear=0.0, zoom=(1.0, 1.0), flip=False)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random float images, so interpolation differences stay small."""
    noise = torch.rand(batch, 3, height + 4, width + 4, generator=_gen(seed))
    return torch.nn.functional.avg_pool2d(noise, 5, 1)


def keras_reference(image: np.ndarray, rotation: float, shear: float, zx: float, zy: float,
                    flip: bool) -> np.ndarray:
    """keras_preprocessing's scipy apply_affine_transform (+ flip_axis), on one (H, W, C) image."""
    t, s = np.deg2rad(rotation), np.deg2rad(shear)
    matrix = (np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
              @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
              @ np.diag([zx, zy, 1.0]))
    oy, ox = image.shape[0] / 2 - 0.5, image.shape[1] / 2 - 0.5
    matrix = np.array([[1, 0, oy], [0, 1, ox], [0, 0, 1]]) @ matrix @ np.array([[1, 0, -oy], [0, 1, -ox], [0, 0, 1]])
    out = np.stack([ndimage.affine_transform(image[..., c], matrix[:2, :2], matrix[:2, 2], order=1,
                                             mode="nearest") for c in range(image.shape[-1])], -1)
    return out[:, ::-1] if flip else out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_all_ranges_zero_is_identity(dtype):
    images = torch.randint(0, 256, (4, 3, 17, 23), generator=_gen()).to(dtype)
    if dtype == torch.float32:
        images = images / 255
    out = augment_batch(images, OFF, _gen())
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out, to_float(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_matches_keras_apply_affine_transform(shape):
    x = _smooth(6, *shape)
    params = sample_params(6, AugmentConfig(rotation=30, shear=20, zoom=(0.7, 1.3)), _gen(1), x.device)
    assert params.flip.any() and not params.flip.all()
    out = apply_affine(x, params)
    for i in range(len(x)):
        ref = keras_reference(x[i].permute(1, 2, 0).double().numpy(), params.rotation[i].item(),
                              params.shear[i].item(), params.zx[i].item(), params.zy[i].item(),
                              bool(params.flip[i]))
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=1e-4)


def test_flip_only_flips_about_half():
    images = torch.randint(0, 256, (2000, 3, 6, 6), generator=_gen(), dtype=torch.uint8)
    cfg = AugmentConfig(rotation=0.0, shear=0.0, zoom=(1.0, 1.0), flip=True)
    out, x = augment_batch(images, cfg, _gen()), to_float(images)
    flipped = (out - x.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    unchanged = (out - x).abs().amax((1, 2, 3)) < 1e-5
    assert (flipped ^ unchanged).all()  # each image is exactly one of the two
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_zoom_above_one_zooms_out():
    images = torch.zeros(1, 3, 32, 32)
    images[..., 8:24, 8:24] = 1.0  # a centred white square
    out = augment_batch(images, AugmentConfig(rotation=0.0, shear=0.0, zoom=(1.5, 1.5), flip=False), _gen())
    assert (out > 0.5).sum() < 0.6 * (images > 0.5).sum()  # the square got smaller: more is shown


def test_output_in_range_with_replicated_border():
    ramp = torch.linspace(0.2, 1.0, 48)
    gradient = (ramp[None, :] + ramp[:, None]) / 2  # (H, W) in [0.2, 1.0]
    images = gradient.expand(64, 3, 48, 48).contiguous()
    out = augment_batch(images, AugmentConfig(), _gen())
    assert out.min() >= 0.2 - 1e-6 and out.max() <= 1.0 + 1e-6  # no fill constant, no overshoot
    border = torch.cat([out[..., 0, :], out[..., -1, :], out[..., :, 0], out[..., :, -1]], -1)
    assert (border > 0.19).all()  # corners come from replicated edges, not zeros
    assert (out - images).abs().mean() > 0.02  # and the images really were transformed


def test_empty_batch():
    assert augment_batch(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), AugmentConfig(), _gen()).shape == (0, 3, 8, 8)


def test_same_generator_seed_same_batch():
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=_gen(), dtype=torch.uint8)
    a, b = augment_batch(images, AugmentConfig(), _gen(5)), augment_batch(images, AugmentConfig(), _gen(5))
    c = augment_batch(images, AugmentConfig(), _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)

"""Batch augmentation: identity at zero ranges, Keras' geometry, flips, range and border fill."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from chae_ablate.augment import AffineParams, apply_affine, augment_batch, sample_params, to_float
from chae_ablate.config import AugmentConfig

OFF = AugmentConfig(rotation=0.0, shear=0.0, zoom=(1.0, 1.0), flip=False)


def _gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator, so every test is reproducible."""
    return torch.Generator().manual_seed(seed)


def _smooth(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random float images, so interpolation differences stay small."""
    noise = torch.rand(batch, 3, height + 4, width + 4, generator=_gen(seed))
    return torch.nn.functional.avg_pool2d(noise, 5, 1)


# A transcription of Keras' legacy ImageDataGenerator path, keras-team/keras at tag v3.3.3
# (commit f6c4ac55692c132cd16211f4877fac6dbeead749), keras/src/legacy/preprocessing/image.py;
# the same code as keras/preprocessing/image.py in v2.9.0 (commit 07e1374) through v2.15.0.
# Line numbers are v3.3.3's; channels_last means row_axis=0, col_axis=1, channel_axis=2 (l. 1018-1020
# and 1409-1411). Kept independent of chae_ablate.augment on purpose: it is the specification.
ROW_AXIS, COL_AXIS, CHANNEL_AXIS = 0, 1, 2


def flip_axis(x, axis):
    """Keras' flip_axis (l. 942-946): reverse one axis."""
    x = np.asarray(x).swapaxes(axis, 0)
    x = x[::-1, ...]
    return x.swapaxes(0, axis)


def transform_matrix_offset_center(matrix, x, y):
    """Keras' transform_matrix_offset_center (l. 1769-1775), called with (h, w)."""
    o_x = float(x) / 2 - 0.5
    o_y = float(y) / 2 - 0.5
    offset_matrix = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset_matrix = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return np.dot(np.dot(offset_matrix, matrix), reset_matrix)


def apply_affine_transform(x, theta=0, shear=0, zx=1, zy=1, row_axis=ROW_AXIS, col_axis=COL_AXIS,
                           channel_axis=CHANNEL_AXIS, fill_mode="nearest", cval=0.0, order=1):
    """Keras' apply_affine_transform (l. 1779-1892) without its input checks and the tx/ty shift,
    which the paper's generator leaves at 0; scipy.ndimage.interpolation.affine_transform is the
    deprecated alias of ndimage.affine_transform."""
    transform_matrix = None
    if theta != 0:
        theta = np.deg2rad(theta)
        transform_matrix = np.array([[np.cos(theta), -np.sin(theta), 0],
                                     [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    if shear != 0:
        shear = np.deg2rad(shear)
        shear_matrix = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
        transform_matrix = shear_matrix if transform_matrix is None else np.dot(transform_matrix, shear_matrix)
    if zx != 1 or zy != 1:
        zoom_matrix = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
        transform_matrix = zoom_matrix if transform_matrix is None else np.dot(transform_matrix, zoom_matrix)
    if transform_matrix is not None:
        h, w = x.shape[row_axis], x.shape[col_axis]
        transform_matrix = transform_matrix_offset_center(transform_matrix, h, w)
        x = np.rollaxis(x, channel_axis, 0)
        if col_axis > row_axis:  # M' = PMP: the matrix was built for (x, y), numpy indexes (y, x)
            transform_matrix[:, [0, 1]] = transform_matrix[:, [1, 0]]
            transform_matrix[[0, 1]] = transform_matrix[[1, 0]]
        final_affine_matrix = transform_matrix[:2, :2]
        final_offset = transform_matrix[:2, 2]
        channel_images = [ndimage.affine_transform(x_channel, final_affine_matrix, final_offset,
                                                   order=order, mode=fill_mode, cval=cval)
                          for x_channel in x]
        x = np.stack(channel_images, axis=0)
        x = np.rollaxis(x, 0, channel_axis + 1)
    return x


def keras_apply_transform(x, theta, shear, zx, zy, flip_horizontal):
    """ImageDataGenerator.apply_transform (l. 1385-1447) on one (H, W, C) image: the affine
    transform, then flip_axis on the column axis (l. 1436-1437); fill_mode='nearest', order=1."""
    x = apply_affine_transform(x, theta, shear, zx, zy, fill_mode="nearest", order=1)
    return flip_axis(x, COL_AXIS) if flip_horizontal else x


def _keras_batch(x: torch.Tensor, p) -> np.ndarray:
    """keras_apply_transform on every image of a (B, C, H, W) batch, back in (B, C, H, W)."""
    return np.stack([keras_apply_transform(x[i].permute(1, 2, 0).double().numpy(), p.rotation[i].item(),
                                           p.shear[i].item(), p.zx[i].item(), p.zy[i].item(), bool(p.flip[i]))
                     for i in range(len(x))]).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_all_ranges_zero_is_identity(dtype):
    """Zero ranges leave images as to_float made them: augmentation off is a no-op."""
    images = torch.randint(0, 256, (4, 3, 17, 23), generator=_gen()).to(dtype)
    if dtype == torch.float32:
        images = images / 255
    out = augment_batch(images, OFF, _gen())
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out, to_float(images), atol=1e-5, rtol=0)


# (theta, shear, zx, zy, flip): flip alone, small and large rotations both ways, large shear,
# anisotropic zoom in and out, everything at once, and one draw near the paper's ranges.
KERAS_CASES = [(0, 0, 1, 1, True), (17, 0, 1, 1, False), (-75, 0, 1, 1, True), (150, 0, 1, 1, False),
               (0, 35, 1, 1, False), (0, 0, 1.6, 0.7, False), (12, -40, 0.6, 1.4, True),
               (-29, 0.2, 0.83, 1.17, True)]


def _params(*cases) -> AffineParams:
    """AffineParams for explicit (theta, shear, zx, zy, flip) tuples."""
    theta, shear, zx, zy, flip = (torch.tensor(v) for v in zip(*cases))
    return AffineParams(rotation=theta.float(), shear=shear.float(), zx=zx.float(), zy=zy.float(), flip=flip)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (41, 27)])
def test_matches_keras_on_chosen_parameters(shape):
    """Pixel for pixel Keras' apply_transform, square and not, on rough (unsmoothed) images."""
    x = to_float(torch.randint(0, 256, (len(KERAS_CASES), 3, *shape), generator=_gen(), dtype=torch.uint8))
    p = _params(*KERAS_CASES)
    np.testing.assert_allclose(apply_affine(x, p).numpy(), _keras_batch(x, p), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_matches_keras_on_sampled_parameters(shape):
    """sample_params' draws mean what Keras means by them, with wide ranges and both flips."""
    x = _smooth(6, *shape)
    p = sample_params(6, AugmentConfig(rotation=60, shear=30, zoom=(0.6, 1.4)), _gen(1), x.device)
    assert p.flip.any() and not p.flip.all()
    np.testing.assert_allclose(apply_affine(x, p).numpy(), _keras_batch(x, p), atol=1e-4, rtol=0)


def test_keras_directions():
    """+theta turns content counter-clockwise, zx squeezes columns, shear moves rows sideways: the
    Keras >= 2.9 conventions; keras_preprocessing 1.1.2's (row, col) order fails all three."""
    dot = torch.zeros(2, 1, 21, 21)
    dot[..., 10, 14] = 1.0  # 4 px right of the centre
    out = apply_affine(dot, _params((90, 0, 1, 1, False), (0, 0, 2, 1, False)))
    assert divmod(out[0, 0].argmax().item(), 21) == (6, 10)  # turned to 4 px above the centre
    assert divmod(out[1, 0].argmax().item(), 21) == (10, 12)  # 2 px right: columns halved
    rows = torch.rand(1, 1, 21, 1, generator=_gen()).expand(1, 1, 21, 21)  # constant along each row
    sheared = apply_affine(rows, _params((0, 30, 1, 1, False)))
    assert torch.allclose(sheared, sheared[..., :1].expand_as(sheared), atol=1e-6)  # rows stay rows


def test_flip_only_flips_about_half():
    """With only flips on, each image is exactly mirrored or untouched, about half of each."""
    images = torch.randint(0, 256, (2000, 3, 6, 6), generator=_gen(), dtype=torch.uint8)
    cfg = AugmentConfig(rotation=0.0, shear=0.0, zoom=(1.0, 1.0), flip=True)
    out, x = augment_batch(images, cfg, _gen()), to_float(images)
    flipped = (out - x.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    unchanged = (out - x).abs().amax((1, 2, 3)) < 1e-5
    assert (flipped ^ unchanged).all()  # each image is exactly one of the two
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_zoom_above_one_zooms_out():
    """Keras' zoom factors > 1 sample a wider area, so content shrinks (the name misleads)."""
    images = torch.zeros(1, 3, 32, 32)
    images[..., 8:24, 8:24] = 1.0  # a centred white square
    cfg = AugmentConfig(rotation=0.0, shear=0.0, zoom=(1.5, 1.5), flip=False)
    out = augment_batch(images, cfg, _gen())
    keras = _keras_batch(images, sample_params(1, cfg, _gen(), images.device))
    for shown in (out.numpy(), keras):
        assert (shown > 0.5).sum() < 0.6 * (images > 0.5).sum().item()  # the square got smaller


def test_output_in_range_with_replicated_border():
    """fill_mode='nearest': corners are filled from the edges, never a constant, and no overshoot."""
    ramp = torch.linspace(0.2, 1.0, 48)
    gradient = (ramp[None, :] + ramp[:, None]) / 2  # (H, W) in [0.2, 1.0]
    images = gradient.expand(64, 3, 48, 48).contiguous()
    out = augment_batch(images, AugmentConfig(), _gen())
    assert out.min() >= 0.2 - 1e-6 and out.max() <= 1.0 + 1e-6  # no fill constant, no overshoot
    border = torch.cat([out[..., 0, :], out[..., -1, :], out[..., :, 0], out[..., :, -1]], -1)
    assert (border > 0.19).all()  # corners come from replicated edges, not zeros
    assert (out - images).abs().mean() > 0.02  # and the images really were transformed


def test_empty_batch():
    """An empty batch comes back empty (affine_grid alone would refuse it)."""
    assert augment_batch(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), AugmentConfig(), _gen()).shape == (0, 3, 8, 8)


def test_same_generator_seed_same_batch():
    """Same generator seed, same augmented batch; another seed, another batch."""
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=_gen(), dtype=torch.uint8)
    a, b = augment_batch(images, AugmentConfig(), _gen(5)), augment_batch(images, AugmentConfig(), _gen(5))
    c = augment_batch(images, AugmentConfig(), _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)

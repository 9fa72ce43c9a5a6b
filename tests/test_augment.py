"""Geometric augmentation: EDM's label layout, exact flips, untouched images when nothing is drawn."""

import numpy as np
import torch

from training.augment import AugmentPipe, rotate2d, translate2d, warp

EDM_AUGMENT = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

def smooth_image(n=32):
    u = torch.linspace(-1, 1, n)
    return (torch.sin(2 * u)[None, :] + 0.5 * torch.cos(3 * u)[:, None])[None, None]

def test_labels_have_edm_layout_and_zero_probability_changes_nothing():
    images = torch.randn(5, 3, 16, 16)
    out, labels = AugmentPipe(p=0, **EDM_AUGMENT)(images)
    assert torch.equal(out, images) and labels.shape == (5, 9) and not labels.any()

def test_flips_are_exact_and_labelled():
    images = torch.randn(64, 1, 8, 8)
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, xflip=1, yflip=1)(images)
    for image, result, (fx, fy) in zip(images, out, labels):
        expected = image.flip(2) if fx else image
        expected = expected.flip(1) if fy else expected
        assert torch.equal(result, expected)
    assert 10 < labels[:, 0].sum() < 54 # About half flipped.

def test_warp_rotates_and_translates_in_the_labelled_direction():
    image = smooth_image()
    rotated = warp(image, rotate2d(torch.tensor([np.pi / 2])))
    assert (rotated - torch.rot90(image, k=1, dims=(2, 3)))[..., 4:-4, 4:-4].abs().max() < 1e-3
    shifted = warp(image, translate2d(torch.tensor([-2.0]), torch.tensor([0.0]))) # Content moves 2 pixels right.
    assert (shifted[..., 4:-4, 6:-2] - image[..., 4:-4, 4:-4]).abs().max() < 1e-3

def test_full_pipeline_keeps_image_statistics():
    torch.manual_seed(1)
    images = smooth_image().repeat(256, 3, 1, 1)
    out, labels = AugmentPipe(p=1, **EDM_AUGMENT)(images)
    assert torch.isfinite(out).all() and labels[:, 2:].abs().sum(dim=1).gt(0).float().mean() > 0.9
    assert abs(out.mean() - images.mean()) < 0.1 and abs(out.std() - images.std()) < 0.15

def test_each_image_is_its_own_warp_or_untouched_whatever_else_is_in_the_batch(monkeypatch):
    # The pipe warps the whole batch and picks per image (no host read of which moved); the result
    # must be what warping that image alone gives, bit for bit, and unmoved images keep their pixels.
    import training.augment as augment_module
    seen = []
    def spy(images, inverse_transform):
        seen.append(inverse_transform)
        return warp(images, inverse_transform)
    monkeypatch.setattr(augment_module, 'warp', spy)
    torch.manual_seed(3)
    images = torch.randn(24, 3, 16, 16)
    out, _labels = AugmentPipe(p=0.3, scale=1, rotate_frac=1, translate_frac=1)(images)
    inverse = seen[0]
    moved = (inverse - torch.eye(3)).abs().amax(dim=(1, 2)) > 1e-6
    assert 0 < moved.sum() < len(images)
    for k in range(len(images)):
        expected = warp(images[k:k + 1], inverse[k:k + 1])[0] if moved[k] else images[k]
        assert torch.equal(out[k], expected), k

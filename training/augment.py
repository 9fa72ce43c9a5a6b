"""Geometric augmentation with augmentation labels, as EDM trains with it (EDM Appendix F.2).

Each image is flipped, scaled, rotated, stretched and translated with some probability, and the
network is told what was done through a 9-dimensional label (the `augment_labels` input of the
networks), so it can learn from augmented images without generating them at sampling time
(augment_labels=None there). The parameterization and the label layout
[xflip, yflip, scale, rotation (cos-1, sin), anisotropy (2), translation (2)] are EDM's, so
networks keep their meaning across the two codebases.

Resampling differs from EDM's wavelet up/down filters: the warp is sampled bicubically on a 2x
finer grid with mirrored borders and box-averaged back, which suppresses aliasing equally well
for the mild scales used here (2^N(0, 0.2^2)).

Pickled into snapshots as `augment_pipe`; may import nothing but numpy, torch and torch_utils.
"""

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Batched 3x3 homogeneous 2D transforms in pixel units, centered on the image.

def translate2d(tx, ty):
    m = torch.eye(3, device=tx.device).repeat(len(tx), 1, 1)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m

def scale2d(sx, sy):
    m = torch.eye(3, device=sx.device).repeat(len(sx), 1, 1)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m

def rotate2d(theta):
    m = torch.eye(3, device=theta.device).repeat(len(theta), 1, 1)
    m[:, 0, 0], m[:, 0, 1] = theta.cos(), -theta.sin()
    m[:, 1, 0], m[:, 1, 1] = theta.sin(), theta.cos()
    return m

def warp(images, inverse_transform):
    """Resample images at `inverse_transform @ (output pixel)`; borders are mirrored."""
    N, C, H, W = images.shape
    to_pixels = torch.diag(torch.tensor([W / 2, H / 2, 1.0], device=images.device)) # Normalized [-1, 1] -> centered pixels.
    from_pixels = torch.linalg.inv_ex(to_pixels).inverse # inv_ex: no singularity check, which would read back from the GPU.
    theta = from_pixels @ inverse_transform @ to_pixels
    grid = torch.nn.functional.affine_grid(theta[:, :2, :], size=[N, C, H * 2, W * 2], align_corners=False)
    fine = torch.nn.functional.grid_sample(images, grid, mode='bicubic', padding_mode='reflection', align_corners=False)
    return torch.nn.functional.avg_pool2d(fine, 2)

#----------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    def __init__(self,
        p                   = 1,        # Overall probability multiplier.
        xflip               = 0,        # Probability multipliers of each augmentation...
        yflip               = 0,
        scale               = 0,
        rotate_frac         = 0,
        aniso               = 0,
        translate_frac      = 0,
        scale_std           = 0.2,      # Log2 standard deviation of isotropic scaling.
        rotate_frac_max     = 1,        # Range of rotation, 1 = full circle.
        aniso_std           = 0.2,      # Log2 standard deviation of anisotropic scaling.
        aniso_rotate_prob   = 0.5,      # Probability of stretching along a rotated axis.
        translate_frac_std  = 0.125,    # Standard deviation of translation, relative to image size.
    ):
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.scale, self.rotate_frac, self.aniso, self.translate_frac = float(scale), float(rotate_frac), float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob, self.translate_frac_std = float(aniso_std), float(aniso_rotate_prob), float(translate_frac_std)

    def _chosen(self, shape, multiplier, device):
        return torch.rand(shape, device=device) < multiplier * self.p

    def __call__(self, images):
        """images [N, C, H, W] -> (augmented images, augmentation labels [N, D] float32)."""
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # Flips: exact pixel permutations.
        for multiplier, dim in [(self.xflip, 3), (self.yflip, 2)]:
            if multiplier > 0:
                w = torch.randint(2, [N, 1, 1, 1], device=device)
                w = torch.where(self._chosen([N, 1, 1, 1], multiplier, device), w, torch.zeros_like(w))
                images = torch.where(w == 1, images.flip(dim), images)
                labels.append(w)

        # Geometric transforms, composed as one inverse map (output pixel -> input pixel).
        inverse = torch.eye(3, device=device).repeat(N, 1, 1)
        transformed = False
        if self.scale > 0:
            w = torch.randn([N], device=device)
            w = torch.where(self._chosen([N], self.scale, device), w, torch.zeros_like(w))
            s = w.mul(self.scale_std).exp2()
            inverse = inverse @ scale2d(1 / s, 1 / s)
            labels.append(w)
            transformed = True
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = torch.where(self._chosen([N], self.rotate_frac, device), w, torch.zeros_like(w))
            inverse = inverse @ rotate2d(w)
            labels += [w.cos() - 1, w.sin()]
            transformed = True
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = torch.where(self._chosen([N], self.aniso, device), w, torch.zeros_like(w))
            r = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            inverse = inverse @ rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r)
            labels += [w * r.cos(), w * r.sin()]
            transformed = True
        if self.translate_frac > 0:
            w = torch.randn([2, N], device=device)
            w = torch.where(self._chosen([1, N], self.translate_frac, device), w, torch.zeros_like(w))
            inverse = inverse @ translate2d(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std))
            labels += [w[0], w[1]]
            transformed = True
        if transformed: # Resampling blurs a little, so images that did not move keep their pixels.
            # The whole batch is warped and each image picks its own result: selecting the moved
            # ones instead (moved.any(), images[moved]) would read the mask back every step.
            moved = (inverse - torch.eye(3, device=device)).abs().amax(dim=(1, 2)) > 1e-6
            images = torch.where(moved[:, None, None, None], warp(images, inverse), images)

        return images, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)

#----------------------------------------------------------------------------

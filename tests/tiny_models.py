"""Small feature networks and image sets that the evaluation tests build themselves.

The real files (EDM's Inception pickle, the SSCD TorchScript model) cannot be downloaded here; these
stand-ins have random weights but the same calling conventions, saved in the same file formats.
"""

import os

import numpy as np
import PIL.Image
import torch

#----------------------------------------------------------------------------

class TinyInception(torch.nn.Module):
    """Like EDM's Inception: uint8 NCHW images of any size, `return_features=True` -> [N, D] float32."""
    def __init__(self, feature_dim: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn([3 * 4 * 4, feature_dim], generator=gen) * 0.5)
        self.bias = torch.nn.Parameter(torch.randn([feature_dim], generator=gen))

    def forward(self, x, return_features: bool = False):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, [4, 4]) # Resizes internally, as Inception does.
        return torch.tanh(x.flatten(1) @ self.proj + self.bias)

class FixedSizeDetector(torch.nn.Module):
    """A detector that only takes images of one size, like most networks that do not resize."""
    def __init__(self, resolution: int = 8, feature_dim: int = 8):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn([3 * resolution * resolution, feature_dim], generator=torch.Generator().manual_seed(1)))

    def forward(self, x, return_features: bool = False):
        return x.to(torch.float32).flatten(1) @ self.proj

class TinySSCD(torch.nn.Module):
    """Like the SSCD TorchScript models: normalized float images [N, 3, 320, 320] -> [N, D] descriptors."""
    def __init__(self, feature_dim: int = 24, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn([3 * 8 * 8, feature_dim], generator=gen))

    def forward(self, x):
        assert x.dtype == torch.float32 and x.shape[1] == 3
        return torch.nn.functional.adaptive_avg_pool2d(x, [8, 8]).flatten(1) @ self.proj

def save_torchscript(module, path):
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return str(path)

#----------------------------------------------------------------------------

def random_images(num, resolution=8, channels=3, seed=0):
    """uint8 NHWC images with some structure (a per-image colour plus noise)."""
    rnd = np.random.RandomState(seed)
    base = rnd.randint(0, 256, size=[num, 1, 1, channels])
    noise = rnd.randint(-40, 41, size=[num, resolution, resolution, channels])
    return np.clip(base + noise, 0, 255).astype(np.uint8)

def write_image_folder(folder, images, subdirs=False):
    """Save NHWC uint8 images as PNGs named like generate.py's output."""
    for i, image in enumerate(images):
        sub = os.path.join(str(folder), f'{i - i % 1000:06d}') if subdirs else str(folder)
        os.makedirs(sub, exist_ok=True)
        PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(os.path.join(sub, f'{i:06d}.png'))
    return str(folder)

#----------------------------------------------------------------------------

"""The optimal denoiser of a finite dataset (Zhang et al., "The Emergence of Reproducibility and
Consistency in Diffusion Models", eq. 4 there; also Karras et al. 2022, eq. 57).

For the empirical distribution of images y_1..y_N, the denoiser that minimizes the denoising loss is
the posterior mean

    D(x; sigma) = sum_i w_i(x) y_i,   w = softmax_i( -||x - y_i||^2 / (2 sigma^2) ).

A diffusion sampler that uses it reproduces training images; Zhang et al. compare trained networks
against it. Evaluating it means comparing x with every image. Here that is ONE streamed pass over the
data per call: distances come from matrix products (||x||^2 is the same for every i and cancels in the
softmax, so only x.y_i - ||y_i||^2 / 2 is needed), and the softmax is accumulated with a running
maximum (log-sum-exp), so nothing of size batch x N x C x H x W is ever formed and tiny sigma far
from every image gives no NaN.

Where the images live: in host memory, always; on the device of x too when they fit (a copy made at
the first call there, when the images take at most RESIDENT_FRACTION of the device's free memory).
Otherwise, e.g. ImageNet-64's 15 GB of uint8 pixels on a 16 GB GPU, each call streams them from
(pinned) host memory in chunks of `chunk_size` images; the arithmetic is the same chunk by chunk,
so both paths give the same numbers. `resident=True/False` forces one path.
"""

import torch

from torch_utils import misc
from training import dataset as dataset_lib

#----------------------------------------------------------------------------

RESIDENT_FRACTION = 0.5 # Of the device's free memory; the rest is for the sampler's and the chunks' working memory.

class OptimalDenoiser(torch.nn.Module):
    """D(x; sigma) = E[y | x] for y drawn uniformly from a set of images.

    Usable where a preconditioned network is (it has img_resolution, img_channels, label_dim,
    sigma_min, sigma_max, round_sigma and forward(x, sigma, class_labels)), and as a denoiser
    of the sampler through `denoise(x, sigma, step)`.
    """
    def __init__(self,
        images,                 # uint8 [N, C, H, W] images (the empirical distribution).
        chunk_size  = 1024,     # Images per step of the streamed pass; bounds the working memory.
        resident    = None,     # Copy the images to the device of x: True, False (stream them), None = if they fit.
    ):
        super().__init__()
        images = torch.as_tensor(images)
        assert images.ndim == 4 and images.dtype == torch.uint8 and images.shape[0] > 0
        self.img_channels = images.shape[1]
        self.img_resolution = images.shape[2]
        self.label_dim = 0
        self.sigma_min = 0
        self.sigma_max = float('inf')
        self.chunk_size = chunk_size
        self.resident = resident
        # Not a buffer: .to(device) moves the module, never the whole data set (see the module docstring).
        self.host_images = images.reshape(images.shape[0], -1)
        if torch.cuda.is_available():
            try:
                self.host_images = self.host_images.pin_memory() # Chunks then copy asynchronously.
            except RuntimeError: # Too much to pin: pageable memory works too, with synchronous copies.
                pass
        self.register_buffer('half_sq_norms', torch.cat([misc.uint8_to_model_range(chunk, torch.float64).square().sum(dim=1) * 0.5 for chunk in self.host_images.split(chunk_size)]))
        self._device_images = None

    @classmethod
    def from_dataset(cls, path, chunk_size=1024, num_workers=2, resident=None):
        """All images of a dataset folder or zip, loaded once into host memory (uint8)."""
        dataset = dataset_lib.ImageFolderDataset(path)
        images = torch.cat([images for images, _labels in dataset_lib.iterate_image_batches(dataset, 256, num_workers=num_workers)])
        return cls(images, chunk_size=chunk_size, resident=resident)

    @property
    def images(self):
        """uint8 [N, C * H * W] images, in host memory."""
        return self.host_images

    def keeps_images_on(self, device, free_bytes=None):
        """Whether the images are copied to `device` (True) or streamed to it per call (False).
        free_bytes: the device's free memory; default: asked from CUDA."""
        device = torch.device(device)
        if self.resident is not None or device == self.host_images.device:
            return self.resident is not False
        if device.type != 'cuda':
            return False
        if free_bytes is None:
            free_bytes, _total = torch.cuda.mem_get_info(device)
        return self.host_images.nbytes <= RESIDENT_FRACTION * free_bytes

    def image_chunks(self, device):
        """The images in chunks of chunk_size, on `device`: from a resident copy, or copied now."""
        device = torch.device(device)
        if not self.keeps_images_on(device):
            return (chunk.to(device, non_blocking=True) for chunk in self.host_images.split(self.chunk_size))
        if device == self.host_images.device:
            return self.host_images.split(self.chunk_size)
        if self._device_images is None or self._device_images.device != device:
            self._device_images = self.host_images.to(device)
        return self._device_images.split(self.chunk_size)

    def _apply(self, fn, *args, **kwargs):
        self._device_images = None # A device copy belongs to the device the module was on.
        return super()._apply(fn, *args, **kwargs)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        """x: [B, C, H, W] at noise level sigma (scalar or one per sample); float64 D(x; sigma)."""
        assert class_labels is None or class_labels.shape[1] == 0, 'the optimal denoiser is unconditional'
        batch_shape = x.shape
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        inv_var = 1 / sigma.square()

        running_max = torch.full([x.shape[0], 1], -float('inf'), dtype=torch.float64, device=x.device)
        weight_sum = torch.zeros([x.shape[0], 1], dtype=torch.float64, device=x.device)
        weighted_images = torch.zeros_like(x)
        for images, half_sq_norms in zip(self.image_chunks(x.device), self.half_sq_norms.to(x.device).split(self.chunk_size)):
            y = misc.uint8_to_model_range(images, torch.float64)
            logits = (x @ y.T - half_sq_norms) * inv_var # -||x - y||^2 / (2 sigma^2) + a constant per row.
            new_max = torch.maximum(running_max, logits.max(dim=1, keepdim=True).values)
            rescale = torch.exp(running_max - new_max) # 0 on the first chunk (exp(-inf)).
            weights = torch.exp(logits - new_max)
            weight_sum = weight_sum * rescale + weights.sum(dim=1, keepdim=True)
            weighted_images = weighted_images * rescale + weights @ y
            running_max = new_max
        return (weighted_images / weight_sum).reshape(batch_shape)

    def denoise(self, x, sigma, step=None):
        """The sampler's denoiser interface (x, sigma, step) -> float64 D(x; sigma)."""
        return self(x, sigma)

#----------------------------------------------------------------------------

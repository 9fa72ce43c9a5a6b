"""Speed of the optimal denoiser: one streamed pass with matrix products vs. the two-pass broadcast.

The straightforward formulation (as in Zhang et al.'s code) passes over the data twice, first for
the largest logit, then for the weighted sums, and forms x - y_i for a chunk of 64 images at a
time as a (batch x 64 x C x H x W) tensor. Both are timed on random uint8 images in memory, so
neither pays for image decoding (the original also re-reads the dataset files on every call).

    python benchmarks/optimal_denoiser.py --num=4096 --batch=64 --resolution=32 --repeats=5
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_seconds
from torch_utils import misc
from training.sampling.optimal_denoiser import OptimalDenoiser

#----------------------------------------------------------------------------

def two_pass_broadcast_denoiser(images, x, sigma, chunk_size=64):
    y_chunks = [misc.uint8_to_model_range(chunk, torch.float64) for chunk in images.split(chunk_size)]
    x = x.to(torch.float64)
    logit = lambda y: -((x[:, None] - y[None]) ** 2).flatten(2).sum(dim=2) / (2 * sigma ** 2)
    best = torch.stack([logit(y).max(dim=1).values for y in y_chunks], dim=1).max(dim=1).values
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    weighted = torch.zeros_like(x)
    for y in y_chunks:
        w = torch.exp(logit(y) - best[:, None])
        total += w.sum(dim=1)
        weighted += (w[:, :, None, None, None] * y[None]).sum(dim=1)
    return weighted / total[:, None, None, None]

#----------------------------------------------------------------------------

@click.command()
@click.option('--num',        help='Dataset images', metavar='INT',      type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--batch',      help='Noisy images per call', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--resolution', help='Image size', metavar='INT',          type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--sigma',      help='Noise level', metavar='FLOAT',       type=float, default=20.0, show_default=True)
@click.option('--repeats',    help='Runs per measurement', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
def main(num, batch, resolution, sigma, repeats):
    """Time one evaluation of the optimal denoiser both ways on CPU and print the ratio."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [num, 3, resolution, resolution], generator=gen, dtype=torch.uint8)
    x = misc.uint8_to_model_range(images[:batch], torch.float64) + sigma * torch.randn([batch, 3, resolution, resolution], generator=gen, dtype=torch.float64)
    denoiser = OptimalDenoiser(images)
    streamed = denoiser(x, sigma)
    reference = two_pass_broadcast_denoiser(images, x, sigma)
    print(f'max |difference| = {(streamed - reference).abs().max().item():.2e}')
    t_streamed = median_seconds(lambda: denoiser(x, sigma), repeats)
    t_reference = median_seconds(lambda: two_pass_broadcast_denoiser(images, x, sigma), repeats)
    print(f'N={num}, batch={batch}, 3x{resolution}x{resolution}, {torch.get_num_threads()} threads, median of {repeats}:')
    print(f'  two-pass broadcast: {t_reference * 1000:8.1f} ms')
    print(f'  one streamed pass:  {t_streamed * 1000:8.1f} ms')
    print(f'  speed-up:           {t_reference / t_streamed:8.1f}x')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Speed of the Jacobian rank: vmapped VJPs (exact) and the randomized sketch (--fast) against one
backward pass per output pixel (torch.autograd.functional.jacobian, as the original code does).

The network is an untrained DDPM++ (SongUNet, EDM preconditioning) with random weights; its
Jacobian's rank is not that of a trained model, but the cost of the exact routes does not depend on
it. The fast route's cost does: it is timed on the network seen through a low-dimensional subspace
too, which gives a Jacobian of known low rank as trained models have at high noise.

    python benchmarks/jacobian_rank.py --resolution=32 --channels=32
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.evaluation import jacobian_rank
from training import networks

#----------------------------------------------------------------------------

def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value

def per_pixel_rank(denoise, x):
    jac = torch.autograd.functional.jacobian(lambda v: denoise(v).reshape(-1), x).reshape(x.numel(), x.numel())
    return jacobian_rank.energy_rank(torch.linalg.svdvals(jac.to(torch.float64)))

#----------------------------------------------------------------------------

@click.command()
@click.option('--resolution', help='Image size', metavar='INT',               type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--channels',   help='model_channels of the network', metavar='INT', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--sigma',      help='Noise level', metavar='FLOAT',            type=float, default=2.0, show_default=True)
@click.option('--subspace',   help='Dimension of the low-rank variant', metavar='INT', type=click.IntRange(min=1), default=40, show_default=True)
@click.option('--chunk',      help='Products per vectorized batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--skip-loop',  help='Do not time the per-pixel loop (slow)', is_flag=True)
def main(resolution, channels, sigma, subspace, chunk, skip_loop):
    """Time the exact, fast and per-pixel Jacobian ranks of one denoiser evaluation."""
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=resolution, img_channels=3, model_type='SongUNet', model_channels=channels,
        channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[resolution // 4], dropout=0).eval().requires_grad_(False)
    x = sigma * torch.randn([1, 3, resolution, resolution], dtype=torch.float64)
    n = x.numel()
    denoise = jacobian_rank.network_function(net, sigma)
    print(f'SongUNet {resolution}x{resolution}, model_channels={channels}, n={n}, sigma={sigma}, {torch.get_num_threads()} threads')
    warmup = torch.randn([n, 8], dtype=torch.float64)
    jacobian_rank.vector_jacobian_products(denoise, x, warmup), jacobian_rank.jacobian_vector_products(denoise, x, warmup)

    t_exact, (rank, _) = timed(lambda: jacobian_rank.exact_jacobian_rank(denoise, x, chunk_size=chunk))
    print(f'  exact (vmapped VJPs):     {t_exact:8.2f} s   rank {rank}')
    t_fast, (rank_fast, _) = timed(lambda: jacobian_rank.fast_jacobian_rank(denoise, x, chunk_size=chunk))
    print(f'  fast (sketch):            {t_fast:8.2f} s   rank {rank_fast}')
    if not skip_loop:
        t_loop, rank_loop = timed(lambda: per_pixel_rank(denoise, x))
        print(f'  per-pixel backward loop:  {t_loop:8.2f} s   rank {rank_loop}')
        print(f'  exact is {t_loop / t_exact:.1f}x faster than the loop')

    basis = torch.linalg.qr(torch.randn([n, subspace], dtype=torch.float64, generator=torch.Generator().manual_seed(1))).Q
    project = lambda v: (basis @ (basis.T @ v.reshape(-1))).reshape(v.shape)
    low_rank = lambda v: project(denoise(project(v)))
    t_exact, (rank, _) = timed(lambda: jacobian_rank.exact_jacobian_rank(low_rank, x, chunk_size=chunk))
    t_fast, (rank_fast, _) = timed(lambda: jacobian_rank.fast_jacobian_rank(low_rank, x, chunk_size=chunk))
    print(f'Same network through a {subspace}-dimensional subspace (rank <= {subspace}):')
    print(f'  exact (vmapped VJPs):     {t_exact:8.2f} s   rank {rank}')
    print(f'  fast (sketch):            {t_fast:8.2f} s   rank {rank_fast}   ({t_exact / t_fast:.1f}x faster)')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Generate images with an EDM-format network pickle.

Flags and outputs are those of NVIDIA EDM's generate.py; for the same pickle and seeds the images
are identical. Run as `python generate.py ...` or `torchrun --nproc_per_node=N generate.py ...`.
"""

import os

import click
import torch
import tqdm

from torch_utils import distributed as dist
from training import checkpoint
from training import dataset
from training import generation
from training import optimal_denoiser as optimal_denoiser_lib

#----------------------------------------------------------------------------

class SeedList(click.ParamType):
    name = 'list'

    def convert(self, value, param, ctx):
        try:
            return generation.parse_seeds(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--network', 'network_pkl',  help='Network pickle filename  [required]', metavar='PATH|URL',          type=str)
@click.option('--outdir',                  help='Where to save the output images', metavar='DIR',                   type=str, required=True)
@click.option('--seeds',                   help='Random seeds (e.g. 1,2,5-10)', metavar='LIST',                     type=SeedList(), default='0-63')
@click.option('--subdirs',                 help='Create subdirectory for every 1000 seeds',                         is_flag=True)
@click.option('--class', 'class_idx',      help='Class label  [default: random]', metavar='INT',                    type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT',                                type=click.IntRange(min=1), default=64)
@click.option('--device',                  help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default=None, show_default=False)
@click.option('--resume',                  help='Skip seeds whose image already exists in --outdir',                is_flag=True)
@click.option('--grid',                    help='Also write grid.png of the first 256 seeds to --outdir',           is_flag=True)

@click.option('--steps', 'num_steps',      help='Number of sampling steps', metavar='INT',                          type=click.IntRange(min=1), default=18)
@click.option('--sigma_min',               help='Lowest noise level  [default: varies]', metavar='FLOAT',           type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max',               help='Highest noise level  [default: varies]', metavar='FLOAT',          type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',                     help='Time step exponent', metavar='FLOAT',                              type=click.FloatRange(min=0, min_open=True), default=7)
@click.option('--S_churn', 'S_churn',      help='Stochasticity strength', metavar='FLOAT',                          type=click.FloatRange(min=0), default=0)
@click.option('--S_min', 'S_min',          help='Stoch. min noise level', metavar='FLOAT',                          type=click.FloatRange(min=0), default=0)
@click.option('--S_max', 'S_max',          help='Stoch. max noise level', metavar='FLOAT',                          type=click.FloatRange(min=0), default='inf')
@click.option('--S_noise', 'S_noise',      help='Stoch. noise inflation', metavar='FLOAT',                          type=float, default=1)

@click.option('--solver',                  help='Ablate ODE solver', metavar='euler|heun',                          type=click.Choice(['euler', 'heun']))
@click.option('--disc', 'discretization',  help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm', type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule',                help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear',           type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling',                 help='Ablate signal scaling s(t)', metavar='vp|none',                    type=click.Choice(['vp', 'none']))

@click.option('--optimal_denoiser',        help='Sample with the closed-form denoiser of --dataset, not a network',  is_flag=True)
@click.option('--dataset', 'dataset_path', help='Images of the optimal denoiser', metavar='ZIP|DIR',                 type=str)

def main(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, device, resume, grid, optimal_denoiser, dataset_path, **sampler_kwargs):
    """Generate random images with EDM's samplers.

    Examples:

    \b
    # Generate 64 images and save them as out/*.png
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # 50k images on 2 GPUs, one folder per 1000 seeds, restartable after a crash
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs --resume \\
        --network=edm-cifar10-32x32-cond-vp.pkl

    \b
    # Euler solver with VP discretization (EDM's generalized sampler)
    python generate.py --outdir=out --solver=euler --disc=vp --schedule=vp --scaling=vp --network=net.pkl

    \b
    # The optimal denoiser of a dataset instead of a network (Euler steps, as Zhang et al.)
    python generate.py --outdir=out --seeds=0-63 --optimal_denoiser --dataset=datasets/cifar10-32x32.zip
    """
    device = dist.init(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Load the network; rank 0 first, so that a download happens once.
    if rank != 0:
        dist.barrier()
    try:
        if optimal_denoiser:
            net = load_optimal_denoiser(dataset_path, network_pkl, sampler_kwargs)
        else:
            if network_pkl is None:
                raise click.ClickException('Missing option --network (or --optimal_denoiser with --dataset)')
            if dataset_path is not None:
                raise click.ClickException('--dataset is only used with --optimal_denoiser')
            dist.print0(f'Loading network from "{network_pkl}"...')
            net = checkpoint.load_network(network_pkl, verbose=(rank == 0))
    except (checkpoint.CheckpointError, dataset.DatasetError) as e:
        raise click.ClickException(str(e))
    finally:
        if rank == 0:
            dist.barrier()
    net = net.to(device)
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.ClickException(f'--class={class_idx} is out of range: the network has {net.label_dim} classes' if net.label_dim
            else f'--class={class_idx} given, but the network is unconditional')

    # Seeds still to do.
    todo = seeds
    if resume:
        todo = [seed for seed in seeds if not os.path.isfile(generation.image_path(outdir, seed, subdirs))]
        dist.print0(f'Resuming: {len(seeds) - len(todo)} of {len(seeds)} images already exist')

    # Generate and save.
    dist.print0(f'Generating {len(todo)} images to "{outdir}"...')
    batches = generation.generate_images(net, todo, max_batch_size=max_batch_size, class_idx=class_idx, device=device,
        sampler_kwargs=sampler_kwargs, rank=rank, world_size=world_size)
    num_batches = len(generation.rank_batches(todo, max_batch_size, rank, world_size))
    for batch in tqdm.tqdm(batches, total=num_batches, unit='batch', disable=(rank != 0)):
        for seed, image in zip(batch.seeds, batch.images):
            generation.save_image(generation.image_path(outdir, seed, subdirs), image)

    dist.barrier()
    if grid and rank == 0:
        images = [generation.load_image(generation.image_path(outdir, seed, subdirs)) for seed in seeds[:256]]
        generation.save_image_grid(os.path.join(outdir, 'grid.png'), images)
    dist.print0('Done.')
    dist.shutdown()

#----------------------------------------------------------------------------

def load_optimal_denoiser(dataset_path, network_pkl, sampler_kwargs):
    """The optimal denoiser of --dataset, stepped with Euler unless --solver says otherwise."""
    if dataset_path is None:
        raise click.ClickException('--optimal_denoiser needs --dataset=ZIP|DIR, the images it denoises towards')
    if network_pkl is not None:
        dist.print0('Note: --network is not used with --optimal_denoiser; image size and channels come from --dataset')
    if sampler_kwargs.get('solver') is None:
        sampler_kwargs['solver'] = 'euler' # Zhang et al. take no 2nd order correction with it.
    dist.print0(f'Loading optimal denoiser images from "{dataset_path}"...')
    return optimal_denoiser_lib.OptimalDenoiser.from_dataset(dataset_path)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

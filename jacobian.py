"""Rank of the Jacobian of a network's denoiser along an EDM sampling trajectory.

The measurement of the generalizability study of Zhang et al.; see training/evaluation/jacobian_rank.py for
the definition of the rank and the exact and fast ways of computing it.
"""

import json
import os

import click

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training import cli_checks
from training import dataset as dataset_lib
from training.sampling import generation
from training.evaluation import jacobian_rank
from training import run_record
from training.sampling import sampler as sampler_lib

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--network_pkl', '--network', 'network_pkl', help='Network pickle filename  [default: the bundled digits model]', metavar='PATH|URL', type=str)
@click.option('--molrg', 'molrg_path',     help='Instead of a network: the exact denoiser of a MoLRG dataset file (trainMoLRG.py)', metavar='PT', type=str)
@click.option('--optimal_denoiser',        help='Instead of a network: the optimal denoiser of --dataset (it memorizes)', is_flag=True)
@click.option('--dataset', 'dataset_path', help='Images of the optimal denoiser', metavar='ZIP|DIR',                type=str)
@click.option('--class', 'class_idx',      help='Class label  [default: random]', metavar='INT',                 type=click.IntRange(min=0), default=None)
@click.option('--seed',                    help='Seed of the trajectory (as in generate.py)', metavar='INT',    type=click.IntRange(min=0), default=0)
@click.option('--steps', 'num_steps',      help='Number of sampling steps', metavar='INT',                       type=click.IntRange(min=2), default=18)
@click.option('--sigma_min',               help='Lowest noise level', metavar='FLOAT',                           type=click.FloatRange(min=0, min_open=True), default=0.002)
@click.option('--sigma_max',               help='Highest noise level', metavar='FLOAT',                          type=click.FloatRange(min=0, min_open=True), default=80)
@click.option('--rho',                     help='Time step exponent', metavar='FLOAT',                           type=click.FloatRange(min=0, min_open=True), default=7)
@click.option('--fast',                    help='Estimate the rank with a randomized sketch instead of the full Jacobian', is_flag=True)
@click.option('--chunk', 'chunk_size',     help='Jacobian products per vectorized batch (memory vs. speed)', metavar='INT', type=click.IntRange(min=1), default=64)
@click.option('--outdir',                  help='Where to write jacobian-rank.json and jacobian-rank.png', metavar='DIR', type=str, default='out-jacobian')
@click.option('--device',                  help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default=None, show_default=False)
def main(network_pkl, molrg_path, optimal_denoiser, dataset_path, class_idx, seed, num_steps, sigma_min, sigma_max, rho, fast, chunk_size, outdir, device):
    """Rank of the Jacobian of D(x; sigma) at each step of an EDM sampling trajectory.

    The rank is the smallest k whose k largest singular values hold 99% of the Jacobian's
    Frobenius norm. Prints one line per step and writes the results as JSON and a plot.

    Examples:

    \b
    # Class 5 of the CIFAR-10 model, full Jacobian at each of 18 steps
    python jacobian.py --class=5 --outdir=out-jacobian \\
        --network_pkl=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-ve.pkl

    \b
    # Randomized estimate: cost follows the rank rather than the image size
    python jacobian.py --network_pkl=network-snapshot-200000.pkl --fast --seed=3

    \b
    # The ground truth for a network trained with trainMoLRG.py: the mixture's exact denoiser
    python jacobian.py --molrg=datasets/MoLRG_dataset_resolution4_classnum2_perclassdim7_sample350.pt

    \b
    # The bundled digits model, then the denoiser that memorizes its training set, on the same seed
    python jacobian.py --outdir=out-jacobian/network
    python jacobian.py --outdir=out-jacobian/memorizing --optimal_denoiser --dataset=bundled/digits-16x16.zip
    """
    cli_checks.output_folder(outdir)
    cli_checks.device_available(device)
    cli_checks.ordered(sigma_min, sigma_max, '--sigma_min', '--sigma_max')
    cli_checks.expect_kind(network_pkl, '--network', cli_checks.NETWORK_KINDS)
    cli_checks.expect_kind(molrg_path, '--molrg', cli_checks.STATE_DICT_KINDS)
    device = dist.init(device)
    dist.download_first_on_rank0(network_pkl) # Once per machine; then every rank loads in parallel.
    try:
        run_record.check_outdir(outdir)
        net, source = generation.load_denoiser(network_pkl, molrg_path, optimal_denoiser, dataset_path, class_idx)
    except (ValueError, checkpoint.CheckpointError, dataset_lib.DatasetError) as e:
        raise click.ClickException(str(e))
    net = net.to(device).eval()
    print(f'Denoiser: {type(net).__module__}.{type(net).__name__}' + (f' around {type(net.model).__name__}' if hasattr(net, 'model') else ''))
    try:
        generation.check_class(net, class_idx)
    except ValueError as e:
        raise click.ClickException(str(e))

    # The trajectory of this seed in generate.py: same latents, same label.
    rnd = sampler_lib.StackedRandomGenerator(device, [seed])
    latents = rnd.randn([1, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = generation.class_labels_for_seeds(net, rnd, 1, class_idx, device)
    dim = net.img_channels * net.img_resolution * net.img_resolution

    mode = 'fast' if fast else 'exact'
    print(f'Jacobian ranks ({mode}, {dim} dimensions) along the trajectory of seed {seed}:')
    report = lambda entry: print(f'SNR 1/sigma: {entry["snr"]:.3f}, rank: {entry["rank"]}', flush=True)
    try:
        results = jacobian_rank.trajectory_jacobian_ranks(net, latents, class_labels, fast=fast, chunk_size=chunk_size, seed=seed,
            callback=report, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    except RuntimeError as e:
        if 'autograd.Function' in str(e) or 'functorch' in str(e).lower():
            reason = str(e).strip().splitlines()[0][:200]
            raise click.ClickException(f'The network\'s code does not support torch.func ({reason}); '
                f'it was not rebuilt on this codebase\'s network classes')
        raise

    label = int(class_labels.argmax()) if class_labels is not None else None
    network_pkl = None if molrg_path or optimal_denoiser else source # The bundled network when none was named.
    summary = dict(network=network_pkl, molrg=molrg_path, dataset=dataset_path, seed=seed, class_idx=label, mode=mode, dim=dim, fraction=jacobian_rank.ENERGY_FRACTION,
        num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, steps=results)
    run_record.write_settings(os.path.join(outdir, 'settings.json'), dict(tool='jacobian.py', denoiser_class=f'{type(net).__module__}.{type(net).__name__}',
        network=run_record.file_record(network_pkl), molrg=run_record.file_record(molrg_path), dataset=run_record.file_record(dataset_path),
        seed=seed, class_idx=label, mode=mode, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, chunk=chunk_size))
    json_path = os.path.join(outdir, 'jacobian-rank.json')
    with dnnlib.util.atomic_write(json_path, mode='w') as f:
        json.dump(summary, f, indent=2)
    title = f'{os.path.basename(source)}, seed {seed}' + (f', class {label}' if label is not None else '') + f' ({mode})'
    jacobian_rank.plot_ranks(results, os.path.join(outdir, 'jacobian-rank.png'), title=title, dim=dim)
    print(f'Saved {json_path}, jacobian-rank.png and settings.json')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Per-step cost of epsilon scaling and time shift, relative to one network evaluation.

Both corrections run once per sampling step around the network: epsilon scaling is one fused
elementwise expression on the denoiser output, time shift a per-sample variance, a window argmin
and a rescale. Each part is timed alone at the sampler's float64 state, with the network timed at
the same batch; the ratio is the overhead a step pays. An end-to-end run of the whole sampler with
and without each correction is timed too, as a check (its noise is larger than the overheads).

The network is the bundled digits model's architecture by default (random weights: speed does not
depend on them), or any pickle via --network.

    python benchmarks/sampler_overhead.py --batch=64 --repeats=20
    python benchmarks/sampler_overhead.py --arch=cifar10 --batch=64 --repeats=5
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_seconds
from training import checkpoint
from training.sampling import epsilon_scaling
from training import networks
from training.sampling import sampler as sampler_lib
from training.sampling import time_shift as time_shift_lib

#----------------------------------------------------------------------------

ARCHITECTURES = {
    # The bundled model: train.py --cbase=16 --cres=1,2,2 on 16x16 grayscale digits, 10 classes.
    'digits':  dict(img_resolution=16, img_channels=1, label_dim=10, model_type='SongUNet', embedding_type='positional',
                    encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                    model_channels=16, channel_mult=[1, 2, 2]),
    # EDM's CIFAR-10 DDPM++ (cond), 56M parameters.
    'cifar10': dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', embedding_type='positional',
                    encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                    model_channels=128, channel_mult=[2, 2, 2]),
}

#----------------------------------------------------------------------------

@click.command()
@click.option('--arch',      help='Network architecture to time', type=click.Choice(list(ARCHITECTURES)), default='digits', show_default=True)
@click.option('--network',   'network_pkl', help='Time this pickle instead of --arch', metavar='PATH|URL', type=str, default=None)
@click.option('--batch',     help='Images per step', metavar='INT', type=click.IntRange(min=2), default=64, show_default=True)
@click.option('--steps',     help='Sampling steps of the end-to-end runs', metavar='INT', type=click.IntRange(min=2), default=13, show_default=True)
@click.option('--repeats',   help='Runs per measurement (median)', metavar='INT', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--threads',   help='torch threads (default: torch decides)', metavar='INT', type=click.IntRange(min=1), default=None)
def main(arch, network_pkl, batch, steps, repeats, threads):
    """Time epsilon scaling and time shift per step against one network evaluation on CPU."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if network_pkl is not None:
        try:
            net = checkpoint.load_network(network_pkl)
        except checkpoint.CheckpointError as e:
            raise click.ClickException(str(e))
    else:
        net = networks.EDMPrecond(**ARCHITECTURES[arch])
    net = net.eval().requires_grad_(False)
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    labels = torch.eye(net.label_dim)[torch.arange(batch) % net.label_dim] if net.label_dim else None
    params = sum(p.numel() for p in net.parameters())
    print(f'Network: {network_pkl or arch} ({params / 1e6:.2f}M parameters), batch {batch}, {torch.get_num_threads()} threads')

    # The sampler's state is float64; the network runs in float32 on what the denoiser passes it.
    ode = sampler_lib.EDMProbabilityFlowODE()
    sigma = torch.tensor(10.0, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * sigma
    denoise = sampler_lib.network_denoiser(net, labels)
    with torch.no_grad():
        denoised = denoise(x, sigma, 3)
        t_network = median_seconds(lambda: denoise(x, sigma, 3), repeats, warmup=1)

        # Epsilon scaling: what the wrapper adds to a denoiser call.
        scale = lambda: x - (x - denoised) / epsilon_scaling.eps_scaler_at(3, 1.004, 0.0001)
        t_scaling = median_seconds(scale, repeats * 10, warmup=1)

        # Time shift at an active step (index above the cutoff): before_step + after_step.
        grid = time_shift_lib.TrainingGrid.vp()
        t_cur, t_next = sigma, torch.tensor(8.0, dtype=torch.float64)
        shift_times = {}
        for rule in ('paper', 'released'):
            shift = time_shift_lib.TimeShift(grid, num_steps=steps, cutoff=300, window=80, rule=rule)
            def one_shift():
                x_start, t_start, t_land = shift.before_step(3, x, t_cur, t_next, ode)
                return shift.after_step(3, x_start, t_land, t_next, ode)
            assert shift.active(3, t_cur, ode) is not None
            shift_times[rule] = median_seconds(one_shift, repeats * 10, warmup=1)

    print(f'One network evaluation:      {t_network * 1e3:9.3f} ms')
    print(f'Epsilon scaling per call:    {t_scaling * 1e3:9.3f} ms  = {100 * t_scaling / t_network:6.3f}% of a network evaluation')
    for rule, seconds in shift_times.items():
        print(f'Time shift ({rule:8s}) /step: {seconds * 1e3:9.3f} ms  = {100 * seconds / t_network:6.3f}% of a network evaluation')

    # End to end: Euler steps (one network evaluation per step), medians of whole runs.
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t_steps = sampler_lib.edm_sigma_steps(steps)
    end_to_end = {
        'plain':           lambda: sampler_lib.sample(denoise, latents, t_steps, solver='euler'),
        'epsilon scaling': lambda: sampler_lib.sample(epsilon_scaling.with_epsilon_scaling(denoise, 1.004), latents, t_steps, solver='euler'),
        'time shift':      lambda: sampler_lib.sample(denoise, latents, t_steps, solver='euler',
                                       time_shift=time_shift_lib.TimeShift(grid, steps, 300, 80, 'paper')),
    }
    with torch.no_grad():
        whole = {name: median_seconds(run, max(3, repeats // 4), warmup=1) for name, run in end_to_end.items()}
    print(f'End to end, Euler {steps} steps (median of {max(3, repeats // 4)} runs):')
    for name, seconds in whole.items():
        print(f'  {name:16s} {seconds:8.3f} s  ({100 * (seconds / whole["plain"] - 1):+6.2f}% vs plain)')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

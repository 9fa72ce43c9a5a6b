"""Epsilon-norm diagnostics of exposure bias, and calibration of the epsilon scaler.

For a network and sampler settings: the mean L2 norm of the predicted noise at every sampling step,
along real sampling trajectories and on training images noised to the same sigma, plus the variance
error (Ning et al., Fig. 6). Writes eps_norm.json, eps_norm.csv, eps_norm.png and settings.json to
--outdir. With --calibrate, also fits the scaler that makes the two norms agree, says whether the fit
converged, and prints the generate.py command.
"""

import os
import shlex
import time

import click
import tqdm

from torch_utils import distributed as dist
from training import bundled
from training import checkpoint
from training import cli_checks
from training.sampling import epsilon_scaling
from training.evaluation import exposure_bias_metrics as metrics
from training import run_record
from training.dataset import DatasetError

#----------------------------------------------------------------------------

def generate_command(network, sampler_kwargs, eps_scaler, kappa=0.0):
    args = ['python', 'generate.py', '--outdir=out', '--seeds=0-49999', f'--network={network}', f'--steps={sampler_kwargs["num_steps"]}']
    for key, flag in [('solver', 'solver'), ('discretization', 'disc'), ('schedule', 'schedule'), ('scaling', 'scaling')]:
        if sampler_kwargs.get(key) is not None:
            args.append(f'--{flag}={sampler_kwargs[key]}')
    args.append(f'--eps_scaler={eps_scaler:.5f}')
    if kappa != 0:
        args.append(f'--kappa={kappa:.6f}')
    return ' '.join(shlex.quote(a) for a in args)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--network', 'network_pkl', help='Network pickle  [default: the bundled digits model]', metavar='PATH|URL', type=str, show_default=False)
@click.option('--data',                   help='Training images (zip or folder)  [default: the bundled digits]', metavar='ZIP|DIR', type=str, show_default=False)
@click.option('--outdir',                 help='Where to write eps_norm.{json,csv,png}', metavar='DIR',     type=str, required=True)
@click.option('--num',                    help='Sampled trajectories and training images', metavar='INT',   type=click.IntRange(min=2), default=1000)
@click.option('--steps', 'num_steps',     help='Number of sampling steps', metavar='INT',                   type=click.IntRange(min=2), default=18)
@click.option('--solver',                 help='ODE solver', metavar='euler|heun',                          type=click.Choice(['euler', 'heun']))
@click.option('--disc', 'discretization', help='Time step discretization', metavar='vp|ve|iddpm|edm',       type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule',               help='Noise schedule', metavar='vp|ve|linear',                    type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling',                help='Signal scaling', metavar='vp|none',                         type=click.Choice(['vp', 'none']))
@click.option('--eps_scaler',             help='Measure with this epsilon scaler', metavar='FLOAT',         type=float, default=1.0)
@click.option('--kappa',                  help='Measure with this scaler slope', metavar='FLOAT',           type=float, default=0.0)
@click.option('--calibrate',              help='Fit the epsilon scaler that matches the two norms',         is_flag=True)
@click.option('--rounds',                 help='Calibration rounds (re-measure, refit)', metavar='INT',     type=click.IntRange(min=1), default=3)
@click.option('--batch', 'batch_size',    help='Maximum batch size', metavar='INT',                         type=click.IntRange(min=1), default=256)
@click.option('--device',                 help='Device  [default: cuda if available]', metavar='cuda|cpu',  type=click.Choice(['cuda', 'cpu']), show_default=False)
def main(network_pkl, data, outdir, num, num_steps, solver, discretization, schedule, scaling, eps_scaler, kappa, calibrate, rounds, batch_size, device):
    """Measure exposure bias as epsilon norms, and calibrate epsilon scaling.

    Examples:

    \b
    # The bundled digits model, Euler 13 steps: curves, plot and a fitted scaler
    python eps_norm.py --outdir=results/eps-norm --steps=13 --solver=euler --calibrate

    \b
    # An EDM CIFAR-10 model with Heun 18 steps, against the CIFAR-10 training set
    python eps_norm.py --outdir=results/cifar --network=edm-cifar10-32x32-uncond-vp.pkl \\
        --data=datasets/cifar10-32x32.zip --steps=18 --calibrate
    """
    cli_checks.output_folder(outdir)
    cli_checks.device_available(device)
    cli_checks.finite(eps_scaler, '--eps_scaler')
    cli_checks.finite(kappa, '--kappa')
    cli_checks.expect_kind(network_pkl, '--network', cli_checks.NETWORK_KINDS)
    start = time.time()
    device = dist.init(device)
    network_pkl = network_pkl or bundled.NETWORK
    data = data or bundled.DATA
    dist.download_first_on_rank0(network_pkl) # Once per machine; then every rank loads in parallel.
    try:
        run_record.check_outdir(outdir)
        epsilon_scaling.check_eps_scaler(eps_scaler, kappa, num_steps)
        net = checkpoint.load_network(network_pkl).to(device)
        images, labels = metrics.load_training_images(data, net, num)
    except (ValueError, checkpoint.CheckpointError, DatasetError) as e:
        raise click.ClickException(str(e))
    sampler_kwargs = dict(num_steps=num_steps, solver=solver, discretization=discretization, schedule=schedule, scaling=scaling)
    seeds = list(range(num))

    print(f'Measuring {num_steps} steps on {num} trajectories and {len(images)} training images...')
    result = metrics.measure(net, images, labels, seeds, sampler_kwargs, eps_scaler, kappa, batch_size, device, progress=True)
    curves = {f'eps_scaler={eps_scaler:g}' + (f', kappa={kappa:g}' if kappa else ''): result}
    for i, (sigma, c, s, v) in enumerate(zip(result['sigma'], result['eps_norm_consecutive'], result['eps_norm_single_step'], result['variance_error'])):
        print(f'step {i:3d}  sigma {sigma:9.4f}  eps norm: consecutive {c:8.4f}  single step {s:8.4f}  ratio {c / s:7.4f}  variance error {v * 100:+7.2f}%')

    if calibrate:
        fitted, history, measured = metrics.calibrate(net, images, labels, seeds, sampler_kwargs, rounds, batch_size, device,
            progress=lambda h: tqdm.tqdm.write(f'calibration round {h["round"]}: constant {h["constant"]:.5f} '
                f'(log fitted/used {h["residual"]:+.5f}), linear {h["linear"][0]:.5f} + {h["linear"][1]:.6f} i'), progress_bars=True)
        result['calibration'] = dict(fitted, history=history)
        label = 'calibrated' if fitted['converged'] else 'not converged'
        curves[f'{label} eps_scaler={fitted["eps_scaler"]:.4f}'] = measured['calibrated']
        print()
        print(metrics.describe_calibration(fitted))
        print('Constant scaler' + ('' if fitted['converged'] else ' (best measured, not converged)') + ':')
        print('  ' + generate_command(network_pkl, sampler_kwargs, fitted['eps_scaler']))
        print('Linear schedule:')
        print('  ' + generate_command(network_pkl, sampler_kwargs, fitted['linear_eps_scaler'], fitted['linear_kappa']))

    os.makedirs(outdir, exist_ok=True)
    run_record.write_settings(os.path.join(outdir, 'settings.json'), dict(tool='eps_norm.py',
        network=run_record.file_record(network_pkl), data=run_record.file_record(data), seeds=f'0-{num - 1}', num=num,
        sampler=sampler_kwargs, eps_scaler=eps_scaler, kappa=kappa, calibrate=calibrate, rounds=rounds,
        calibration_tolerance=metrics.CONVERGENCE_TOLERANCE, calibration=result.get('calibration')))
    metrics.save_curves(result, outdir)
    metrics.plot_curves(curves, os.path.join(outdir, 'eps_norm.png'), title=f'{os.path.basename(network_pkl)}, {num_steps} steps, {solver or "heun"}')
    print(f'Wrote eps_norm.json, eps_norm.csv, eps_norm.png and settings.json to "{outdir}" in {time.time() - start:.0f} s')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

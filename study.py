"""Exposure-bias study in one command: epsilon-norm curves, calibrated scalers, and an FD table.

See training/studies/exposure_bias_study.py for what is measured. Defaults run the bundled digits model,
data, detector and reference statistics, offline on a CPU.
"""

import os
import re
import math
import time

import click
import torch

from torch_utils import distributed as dist
from training import cli_checks
from training import bundled
from training import checkpoint
from training.studies import exposure_bias_study
from training.evaluation import exposure_bias_metrics as metrics
from training.evaluation import feature_detectors
from training.evaluation import frechet
from training import run_record
from training.dataset import DatasetError

#----------------------------------------------------------------------------

EPS_SCALER_LIST = cli_checks.NumberList(float, lambda v: math.isfinite(v) and v > 0, 'numbers', 'at least one positive eps_scaler')

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--outdir',      help='Where to write the results; a folder with the same settings is continued  [default: a new study-runs/NNNNN-<network>]', metavar='DIR', type=str, show_default=False)
@click.option('--restart',     help='Start the study in --outdir over, whatever it holds', is_flag=True)
@click.option('--network',     'network_pkl', help='Network pickle  [default: the bundled digits model]', metavar='PATH|URL', type=str, show_default=False)
@click.option('--data',        help='Training images  [default: the bundled digits]', metavar='ZIP|DIR', type=str, show_default=False)
@click.option('--ref',         'ref_path', help='Reference statistics  [default: the bundled ones]', metavar='NPZ', type=str, show_default=False)
@click.option('--detector',    'detector_path', help='Feature detector  [default: the bundled one for references made with it, else Inception]', metavar='PATH|URL', type=str, show_default=False)
@click.option('--num',         'num_images', help='Generated images per FD entry', metavar='INT', type=click.IntRange(min=2), default=400)
@click.option('--num_calibration', help='Trajectories and training images for the eps-norm curves', metavar='INT', type=click.IntRange(min=2), default=128)
@click.option('--rounds',      help='Calibration rounds', metavar='INT', type=click.IntRange(min=1), default=3)
@click.option('--eps_scalers', help='eps_scaler values of the FD table (the calibrated one is added)', metavar='LIST', type=EPS_SCALER_LIST, default='1,1.003,1.006,1.01')
@click.option('--cutoff',      help='Time shift cutoff (1000-step grid index)', metavar='INT', type=click.IntRange(0, 1000), default=300)
@click.option('--window',      help='Time shift window (1000-step grid)', metavar='INT', type=click.IntRange(min=1), default=80)
@click.option('--batch',       'batch_size', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=128)
@click.option('--device',      help='Device  [default: cuda if available]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), show_default=False)
def main(outdir, restart, network_pkl, data, ref_path, detector_path, num_images, num_calibration, rounds, eps_scalers, cutoff, window, batch_size, device):
    """Measure exposure bias and what epsilon scaling and time shift do about it.

    Writes to --outdir (by default a new numbered folder under study-runs/):
    eps_norm_<sampler>.{png,json,csv} (curves before and after calibration), fd_table.csv, fd.png,
    summary.md, study.json and settings.json. Run again with the same --outdir and settings to
    continue an interrupted study; finished entries are kept. A folder with other settings is
    refused unless --restart.

    Examples:

    \b
    # The bundled digits model, Euler 13 and Heun 18 steps, into a new study-runs/NNNNN-edm-digits-16x16
    python study.py

    \b
    # Regenerate the committed results/study on purpose
    python study.py --outdir=results/study --restart

    \b
    # A quick look with fewer images
    python study.py --outdir=results/quick --num=200 --num_calibration=64 --rounds=1
    """
    start = time.time()
    if outdir is not None:
        cli_checks.output_folder(outdir) # An empty --outdir= is refused, not taken for the default.
    network_pkl = network_pkl or bundled.NETWORK
    data = data or bundled.DATA
    ref_path = ref_path or bundled.REF
    outdir = outdir or new_run_folder('study-runs', network_pkl)
    try:
        run_record.check_outdir(outdir)
    except ValueError as e:
        raise click.ClickException(str(e))
    cli_checks.output_folder(outdir)
    cli_checks.device_available(device)
    cli_checks.readable_npz(ref_path, '--ref', required_keys=['mu', 'sigma'])
    cli_checks.expect_kind(network_pkl, '--network', cli_checks.NETWORK_KINDS)
    cli_checks.expect_kind(detector_path, '--detector', cli_checks.TORCH_MODULE_KINDS)
    device = dist.init(device)
    dist.download_first_on_rank0(network_pkl, ref_path, detector_path) # Once per machine; then every rank loads in parallel.
    try:
        net = checkpoint.load_network(network_pkl).to(device).eval()
        images, labels = metrics.load_training_images(data, net, max(num_images, num_calibration))
        ref_mu, ref_sigma, recorded = frechet.load_stats(ref_path, with_detector=True)
        detector_path = detector_path or feature_detectors.default_detector(recorded)
        print(f'Using detector {detector_path}')
        detector = feature_detectors.load_feature_detector(detector_path, [net.img_channels, net.img_resolution, net.img_resolution], device=device)
        frechet.check_detector(recorded, detector, ref_path)
        if detector.feature_dim != ref_mu.shape[0]:
            raise click.ClickException(f'{ref_path} holds {ref_mu.shape[0]}-dimensional statistics, detector {detector_path} gives {detector.feature_dim}')
    except (checkpoint.CheckpointError, DatasetError, frechet.StatsError, feature_detectors.DetectorError) as e:
        raise click.ClickException(str(e))

    inputs = dict(network=run_record.file_record(network_pkl), data=run_record.file_record(data), ref=run_record.file_record(ref_path),
        detector=run_record.file_record(detector_path))
    identity = {name: (record['sha256'] or record['path']) for name, record in inputs.items()} # Where the files lie does not matter.
    try:
        study = exposure_bias_study.Study(net, images, labels, detector, ref_mu, ref_sigma, outdir,
            num_images=num_images, num_calibration=num_calibration, calibration_rounds=rounds, eps_scalers=eps_scalers,
            cutoff=cutoff, window=window, batch_size=batch_size, device=device, inputs=identity, restart=restart)
    except exposure_bias_study.StudyFolderError as e:
        raise click.ClickException(str(e))
    if study.kept_entries is not None:
        print(f'Resuming the study in "{outdir}": {study.kept_entries} entries kept (same settings); --restart starts over')
    else:
        print(f'Writing a new study to "{outdir}"')
    run_record.write_settings(os.path.join(outdir, 'settings.json'), dict(tool='study.py', **inputs, config=study.config,
        fd_seeds=f'0-{num_images - 1}', calibration_seeds=f'0-{num_calibration - 1}', batch=batch_size, device=str(device)))
    with torch.no_grad():
        study.run()
    print()
    print(exposure_bias_study.summary_markdown(study.results))
    print(f'Wrote results to "{outdir}" in {time.time() - start:.0f} s')

def new_run_folder(root, network_pkl):
    """root/NNNNN-<network name>, numbered after the folders already there (as train.py numbers runs)."""
    name = re.sub(r'\.pkl$', '', os.path.basename(network_pkl.rstrip('/'))) or 'network'
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', d) for d in (os.listdir(root) if os.path.isdir(root) else [])) if m]
    return os.path.join(root, f'{max(ids, default=-1) + 1:05d}-{name}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

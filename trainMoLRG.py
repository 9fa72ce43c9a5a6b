"""Train a diffusion model on a mixture of low-rank Gaussians (MoLRG, Wang et al. 2024).

The command line of the authors' trainMoLRG.py: the dataset is generated into --path (or taken
from there if it exists), then training runs through train.py's options and training loop, so
everything train.py does (resume, torchrun, CDM, snapshots NVIDIA EDM loads) works here too.
"""

import os

import click

import dnnlib
from torch_utils import distributed as dist
from training import cli_checks
from training import molrg
from training import run_record
from training import training_options

#----------------------------------------------------------------------------

# train.py's options that this command does not offer, at train.py's defaults (tests/test_thin_cli.py checks them).
TRAIN_DEFAULTS = dict(xflip=False, cache=True, S_churn=10.0, S_min=0.01, S_max=1.0, S_noise=1.007)

@click.command(context_settings=dict(show_default=True, max_content_width=120))

# The mixture.
@click.option('--path',             help='Folder of the dataset file (generated if missing)', metavar='DIR', type=str, required=True)
@click.option('--img_res',          help='Image resolution; the ambient dimension is 3*res*res', metavar='INT', type=click.IntRange(min=1), default=32)
@click.option('--class_num',        help='Number of classes (subspaces)', metavar='INT',           type=click.IntRange(min=1), default=10)
@click.option('--per_class_dim',    help='Dimension of each class\'s subspace', metavar='INT',     type=click.IntRange(min=1), default=100)
@click.option('--sample_per_class', help='Samples drawn per class', metavar='INT',                 type=click.IntRange(min=1), default=5000)
@click.option('--data_seed',        help='Seed of the bases and samples', metavar='INT',           type=click.IntRange(min=0), default=0)

# Main options (train.py's).
@click.option('--outdir',           help='Where to save the results (in a folder named after the dataset)', metavar='DIR', type=str, default='training-runs')
@click.option('--cond',             help='Train class-conditional model', metavar='BOOL',          type=bool, default=False)
@click.option('--arch',             help='Network architecture', metavar='ddpmpp|ncsnpp|adm',      type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp')
@click.option('--precond',          help='Preconditioning & loss function', metavar='vp|ve|edm|cdm', type=click.Choice(['vp', 've', 'edm', 'cdm']), default='edm')
@click.option('--embed_channels',   help='Channel multiplier of the network (model_channels)', metavar='INT', type=click.IntRange(min=1), default=1024)

# Hyperparameters.
@click.option('--duration',         help='Training duration', metavar='MIMG',                      type=click.FloatRange(min=0, min_open=True), default=6)
@click.option('--batch',            help='Total batch size', metavar='INT',                        type=click.IntRange(min=1), default=512)
@click.option('--batch-gpu',        help='Limit batch size per GPU', metavar='INT',                type=click.IntRange(min=1))
@click.option('--cbase',            help='Channel multiplier; overrides --embed_channels', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres',             help='Channels per resolution  [default: 2,2,2]', metavar='LIST', type=cli_checks.parse_int_list)
@click.option('--lr',               help='Learning rate', metavar='FLOAT',                         type=click.FloatRange(min=0, min_open=True), default=10e-4)
@click.option('--lr_rampup',        help='Learning rate ramp-up length', metavar='KIMG',           type=click.FloatRange(min=0), default=10000)
@click.option('--optimizer',        help='Optimizer', metavar='adam|sgd',                          type=click.Choice(['adam', 'sgd']), default='adam')
@click.option('--ema',              help='EMA half-life', metavar='MIMG',                          type=click.FloatRange(min=0), default=0.5)
@click.option('--dropout',          help='Dropout probability', metavar='FLOAT',                   type=click.FloatRange(min=0, max=1), default=0.13)
@click.option('--augment',          help='Augment probability', metavar='FLOAT',                   type=click.FloatRange(min=0, max=1), default=0.12)
@click.option('--martingale_lambda', help='CDM: weight of the consistency term', metavar='FLOAT', type=click.FloatRange(min=0), default=10.0)
@click.option('--martingale_steps', help='CDM: noise levels per trajectory', metavar='INT',       type=click.IntRange(min=2), default=6)

# Performance-related.
@click.option('--fp16',             help='Enable mixed-precision training', metavar='BOOL',        type=bool, default=False)
@click.option('--ls',               help='Loss scaling', metavar='FLOAT',                          type=click.FloatRange(min=0, min_open=True), default=1)
@click.option('--bench',            help='Enable cuDNN benchmarking', metavar='BOOL',              type=bool, default=True)
@click.option('--workers',          help='DataLoader worker processes', metavar='INT',             type=click.IntRange(min=0), default=1)
@click.option('--device',           help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default=None, show_default=False)

# I/O-related.
@click.option('--desc',             help='String to include in result dir name', metavar='STR',    type=str)
@click.option('--nosubdir',         help='Do not create a subdirectory for results',               is_flag=True)
@click.option('--tick',             help='How often to print progress', metavar='KIMG',            type=click.FloatRange(min=0, min_open=True), default=50)
@click.option('--snap',             help='How often to save snapshots', metavar='TICKS',           type=click.IntRange(min=1), default=10)
@click.option('--dump',             help='How often to dump state', metavar='TICKS',               type=click.IntRange(min=1), default=500)
@click.option('--seed',             help='Random seed of training  [default: random]', metavar='INT', type=int)
@click.option('--transfer',         help='Transfer learning from network pickle', metavar='PKL|URL', type=str)
@click.option('--resume',           help='Resume from previous training state', metavar='PT',      type=str)
@click.option('-n', '--dry-run',    help='Print training options and exit (the dataset is still generated)', is_flag=True)

def main(path, img_res, class_num, per_class_dim, sample_per_class, data_seed, outdir, embed_channels, cbase, **train_kwargs):
    """Train a diffusion model on a mixture of low-rank Gaussians: class k's samples are
    U_k a with a ~ N(0, I) and U_k an orthonormal basis of per_class_dim columns in the
    3*img_res*img_res dimensional image space (Wang et al., "Diffusion models learn
    low-dimensional distributions via subspace clustering").

    The dataset, with its bases, is the file
    {path}/MoLRG_dataset_resolution{R}_classnum{K}_perclassdim{d}_sample{n}.pt, written once
    and reused (same --data_seed, same file); the run folder is
    {outdir}/MoLRG_dataset_..._sample{n}/{NNNNN}-MoLRG-... . The other options are train.py's.

    Examples:

    \b
    # The authors' setting: 2 classes of dimension 7 in 4x4x3 images, 350 samples each
    torchrun --standalone --nproc_per_node=1 trainMoLRG.py --outdir training-runs --path datasets \\
        --img_res 4 --class_num 2 --per_class_dim 7 --sample_per_class 350 --embed_channels 128

    \b
    # A small network on CPU, without augmentation, then the Jacobian rank of the result
    python trainMoLRG.py --outdir training-runs --path datasets --img_res 4 --class_num 2 --per_class_dim 7 \\
        --sample_per_class 350 --embed_channels 16 --augment 0 --batch 64 --duration 0.05 --lr_rampup 10 --device cpu
    python jacobian.py --network_pkl training-runs/MoLRG_dataset_resolution4_classnum2_perclassdim7_sample350/00000-MoLRG-uncond-ddpmpp-edm-gpus1-batch64-fp32/network-snapshot-000050.pkl
    """
    cli_checks.output_folder(path, '--path')
    cli_checks.output_folder(outdir)
    cli_checks.device_available(train_kwargs['device'])
    dimension = 3 * img_res * img_res # The samples (float32) and the orthonormal bases (float64) of every class.
    cli_checks.memory_fits(4 * dimension * class_num * sample_per_class + 8 * dimension * class_num * per_class_dim,
        'The MoLRG dataset', 'give a smaller --img_res, --class_num, --per_class_dim or --sample_per_class')
    try:
        run_record.check_outdir(outdir) # The authors' command says --outdir training, which would write into the package.
    except ValueError as e:
        raise click.ClickException(str(e))
    device = dist.init(train_kwargs['device'])
    data = os.path.join(path, molrg.dataset_filename(img_res, class_num, per_class_dim, sample_per_class))

    # Rank 0 writes the dataset; every rank learns whether that worked (no rank waits on a failed one).
    error = None
    if dist.get_rank() == 0:
        try:
            outcome = molrg.prepare_molrg(data, img_res, class_num, per_class_dim, sample_per_class, seed=data_seed)
            dist.print0(f'{"Generated" if outcome == "generated" else "Using existing"} MoLRG dataset "{data}"')
        except (ValueError, OSError) as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise click.ClickException(error)

    # Then train as train.py would with these options.
    opts = dnnlib.EasyDict(TRAIN_DEFAULTS, **train_kwargs, outdir=os.path.join(outdir, os.path.splitext(os.path.basename(data))[0]), data=data,
        cbase=(cbase if cbase is not None else embed_channels))
    cli_checks.output_folder(opts.outdir)
    cli_checks.expect_kind(opts.transfer, '--transfer', cli_checks.NETWORK_KINDS)
    try:
        training_options.run(opts, device)
    except training_options.OptionsError as e:
        raise click.ClickException(str(e))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Train a diffusion model with EDM's recipe, optionally with consistency regularization (CDM).

Flags, defaults and the run folder are those of NVIDIA EDM's train.py; snapshots load in its
generate.py. Run as `python train.py ...` or `torchrun --nproc_per_node=N train.py ...`.
"""

import warnings

import click

import dnnlib
from torch_utils import distributed as dist
from training import cli_checks
from training import training_options

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides') # Harmless DDP notice.

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))

# Main options.
@click.option('--outdir',        help='Where to save the results', metavar='DIR',                   type=str, required=True)
@click.option('--data',          help='Path to the dataset', metavar='ZIP|DIR|PT',                  type=str, required=True)
@click.option('--cond',          help='Train class-conditional model', metavar='BOOL',              type=bool, default=False)
@click.option('--arch',          help='Network architecture', metavar='ddpmpp|ncsnpp|adm',          type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp')
@click.option('--precond',       help='Preconditioning & loss function', metavar='vp|ve|edm|cdm',   type=click.Choice(['vp', 've', 'edm', 'cdm']), default='edm')

# Hyperparameters.
@click.option('--duration',      help='Training duration', metavar='MIMG',                          type=click.FloatRange(min=0, min_open=True), default=200)
@click.option('--batch',         help='Total batch size', metavar='INT',                            type=click.IntRange(min=1), default=512)
@click.option('--batch-gpu',     help='Limit batch size per GPU', metavar='INT',                    type=click.IntRange(min=1))
@click.option('--cbase', '--model_channels', 'cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres',          help='Channels per resolution  [default: varies]', metavar='LIST', type=cli_checks.parse_int_list)
@click.option('--lr',            help='Learning rate', metavar='FLOAT',                             type=click.FloatRange(min=0, min_open=True), default=10e-4)
@click.option('--lr_rampup',     help='Learning rate ramp-up length (EDM fixes it at 10 Mimg)', metavar='KIMG', type=click.FloatRange(min=0), default=10000)
@click.option('--optimizer',     help='Optimizer (plain SGD as in the MoLRG experiments)', metavar='adam|sgd', type=click.Choice(['adam', 'sgd']), default='adam')
@click.option('--ema',           help='EMA half-life', metavar='MIMG',                              type=click.FloatRange(min=0), default=0.5)
@click.option('--dropout',       help='Dropout probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.13)
@click.option('--augment',       help='Augment probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.12)
@click.option('--xflip',         help='Enable dataset x-flips', metavar='BOOL',                     type=bool, default=False)

# Consistency regularization (--precond=cdm).
@click.option('--martingale_lambda', help='CDM: weight of the consistency term', metavar='FLOAT',   type=click.FloatRange(min=0), default=10.0)
@click.option('--martingale_steps',  help='CDM: noise levels per trajectory', metavar='INT',        type=click.IntRange(min=2), default=6)
@click.option('--S_churn', 'S_churn', help='CDM: recorded for compatibility; no effect', metavar='FLOAT', type=click.FloatRange(min=0), default=10.0)
@click.option('--S_min', 'S_min',    help='CDM: recorded for compatibility; no effect', metavar='FLOAT', type=click.FloatRange(min=0), default=0.01)
@click.option('--S_max', 'S_max',    help='CDM: recorded for compatibility; no effect', metavar='FLOAT', type=click.FloatRange(min=0), default=1.0)
@click.option('--S_noise', 'S_noise', help='CDM: recorded for compatibility; no effect', metavar='FLOAT', type=click.FloatRange(min=0), default=1.007)

# Performance-related.
@click.option('--fp16',          help='Enable mixed-precision training', metavar='BOOL',            type=bool, default=False)
@click.option('--ls',            help='Loss scaling', metavar='FLOAT',                              type=click.FloatRange(min=0, min_open=True), default=1)
@click.option('--bench',         help='Enable cuDNN benchmarking', metavar='BOOL',                  type=bool, default=True)
@click.option('--cache',         help='Cache dataset in CPU memory', metavar='BOOL',                type=bool, default=True)
@click.option('--workers',       help='DataLoader worker processes', metavar='INT',                 type=click.IntRange(min=0), default=1)
@click.option('--device',        help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default=None, show_default=False)

# I/O-related.
@click.option('--desc',          help='String to include in result dir name', metavar='STR',        type=str)
@click.option('--nosubdir',      help='Do not create a subdirectory for results',                   is_flag=True)
@click.option('--tick',          help='How often to print progress', metavar='KIMG',                type=click.FloatRange(min=0, min_open=True), default=50)
@click.option('--snap',          help='How often to save snapshots', metavar='TICKS',               type=click.IntRange(min=1), default=50)
@click.option('--dump',          help='How often to dump state', metavar='TICKS',                   type=click.IntRange(min=1), default=500)
@click.option('--seed',          help='Random seed  [default: random]', metavar='INT',              type=int)
@click.option('--transfer',      help='Transfer learning from network pickle', metavar='PKL|URL',   type=str)
@click.option('--resume',        help='Resume from previous training state', metavar='PT',          type=str)
@click.option('-n', '--dry-run', help='Print training options and exit',                            is_flag=True)

def main(**kwargs):
    """Train a diffusion model with the techniques of EDM ("Elucidating the Design Space of
    Diffusion-Based Generative Models"), optionally with the consistency regularization of CDM
    ("Consistent Diffusion Models", --precond=cdm).

    Examples:

    \b
    # Class-conditional CIFAR-10, DDPM++, on 8 GPUs (EDM's recipe)
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # The same with consistency regularization (CDM's recipe)
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp --precond=cdm --martingale_lambda=10

    \b
    # FFHQ / AFHQv2 64x64 (EDM's settings)
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --data=datasets/ffhq-64x64.zip \\
        --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15

    \b
    # The bundled digits model (bundled/edm-digits-16x16.pkl), on CPU
    python train.py --outdir=training-runs --data=bundled/digits-16x16.zip --cond=1 --cbase=16 --cres=1,2,2 \\
        --batch=128 --duration=0.3 --lr_rampup=100 --ema=0.05 --tick=10 --snap=5 --dump=5 --device=cpu --workers=1 --seed=1

    \b
    # Continue a run exactly where its last training state left it
    python train.py --outdir=training-runs --data=datasets/cifar10-32x32.zip --cond=1 \\
        --resume=training-runs/00000-cifar10-32x32-cond-ddpmpp-edm-gpus8-batch512-fp32/training-state-050000.pt
    """
    opts = dnnlib.EasyDict(kwargs)
    cli_checks.output_folder(opts.outdir)
    cli_checks.device_available(opts.device)
    cli_checks.expect_kind(opts.transfer, '--transfer', cli_checks.NETWORK_KINDS)
    device = dist.init(opts.device)

    try:
        training_options.run(opts, device)
    except training_options.OptionsError as e:
        raise click.ClickException(str(e))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

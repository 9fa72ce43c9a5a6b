"""Train a diffusion model with EDM's recipe, optionally with consistency regularization (CDM).

Flags, defaults and the run folder are those of NVIDIA EDM's train.py; snapshots load in its
generate.py. Run as `python train.py ...` or `torchrun --nproc_per_node=N train.py ...`.
"""

import copy
import json
import os
import re
import warnings

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training import cli_checks
from training import safety
from training import training_loop
from training.dataset import DatasetError

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides') # Harmless DDP notice.

#----------------------------------------------------------------------------

def parse_int_list(s):
    if isinstance(s, list):
        return s
    try:
        values = []
        for part in s.split(','):
            m = re.fullmatch(r'(\d+)-(\d+)', part)
            values.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
        return values
    except ValueError:
        raise click.BadParameter(f'"{s}" is not a list of integers like 1,2,2')

def next_run_dir(outdir, desc):
    """{outdir}/{NNNNN}-{desc} with NNNNN one more than the largest existing run number."""
    ids = [int(m.group()) for m in (re.match(r'^\d+', x) for x in (os.listdir(outdir) if os.path.isdir(outdir) else [])) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')

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
@click.option('--cres',          help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
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
    if device.type == 'cuda':
        torch.multiprocessing.set_start_method('spawn', force=True) # DataLoader workers must not inherit CUDA state.

    try:
        c = build_config(opts, device)
    except (DatasetError, checkpoint.CheckpointError) as e:
        raise click.ClickException(str(e))
    except TrainingFinished as e:
        dist.print0(str(e))
        return

    summary = { # The few settings worth a second look before hours of training.
        'Output directory':       c.run_dir,
        'Dataset path':           c.dataset_kwargs.path,
        'Class-conditional':      c.dataset_kwargs.use_labels,
        'Network architecture':   opts.arch,
        'Preconditioning & loss': opts.precond,
        'Number of ranks':        f'{dist.get_world_size()} ({device.type})',
        'Batch size':             c.batch_size,
        'Mixed-precision':        c.network_kwargs.use_fp16,
    }
    for line in ['', 'Training options:', json.dumps(c, indent=2), '']:
        dist.print0(line)
    for label, value in summary.items():
        dist.print0(f'{label + ":":<25}{value}')
    dist.print0()
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    # Only now, with every option checked, does the run folder appear.
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), mode='w') as f:
            json.dump(c, f, indent=2)
        dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
    training_loop.training_loop(device=device, **c)
    dist.shutdown()

#----------------------------------------------------------------------------
# --arch: the network's architecture settings (--cbase and --cres override the last two).

ARCHITECTURES = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

# --precond: (preconditioned network class, loss class). cdm is EDM's preconditioning and loss plus
# the consistency term of Daras et al.
PRECONDITIONINGS = {
    'vp':  ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    've':  ('training.networks.VEPrecond', 'training.loss.VELoss'),
    'edm': ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
    'cdm': ('training.networks.EDMPrecond', 'training.loss.MartingaleLoss'),
}

#----------------------------------------------------------------------------

class TrainingFinished(Exception):
    """--resume of a state that already reached --duration: nothing to train, nothing to write."""

def build_config(opts, device):
    """All training options as the keyword arguments of training_loop(); ClickException for bad input."""
    c = dnnlib.EasyDict()
    # A .pt file is a low-rank Gaussian mixture written by trainMoLRG.py; anything else holds images.
    dataset_class = 'training.molrg.MoLRGDataset' if opts.data.lower().endswith('.pt') else 'training.dataset.ImageFolderDataset'
    c.dataset_kwargs = dnnlib.EasyDict(class_name=dataset_class, path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=(device.type == 'cuda'), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.prefetch_factor = 2
    c.network_kwargs = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict()
    if opts.optimizer == 'sgd': # No momentum, no weight decay: the authors' trainMoLRG.py --optimizer=sgd.
        c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.SGD', lr=opts.lr)
    else:
        c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    # Dataset: must exist, be readable and have labels when --cond.
    if not os.path.exists(opts.data):
        raise click.ClickException(f'--data: dataset not found: {opts.data}')
    dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    dataset_name = dataset_obj.name
    c.dataset_kwargs.resolution = dataset_obj.resolution
    c.dataset_kwargs.max_size = len(dataset_obj)
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
    del dataset_obj

    # Architecture, then preconditioning and loss, from the tables above.
    c.network_kwargs.update(copy.deepcopy(ARCHITECTURES[opts.arch]))
    c.network_kwargs.class_name, c.loss_kwargs.class_name = PRECONDITIONINGS[opts.precond]
    if opts.precond == 'cdm':
        c.loss_kwargs.update(martingale_lambda=opts.martingale_lambda, num_steps=opts.martingale_steps,
            S_churn=opts.S_churn, S_min=opts.S_min, S_max=opts.S_max, S_noise=opts.S_noise)

    # Network options.
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if interface_kwargs['img_resolution'] % (2 ** (len(c.network_kwargs.channel_mult) - 1)) != 0:
        raise click.ClickException(f'{interface_kwargs["img_resolution"]}x{interface_kwargs["img_resolution"]} images cannot be halved '
            f'{len(c.network_kwargs.channel_mult) - 1} times; give fewer --cres levels')
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)

    # Training options.
    world_size = dist.get_world_size()
    if opts.batch % world_size != 0 or (opts.batch_gpu is not None and (opts.batch // world_size) % min(opts.batch_gpu, opts.batch // world_size) != 0):
        raise click.ClickException(f'--batch={opts.batch} must be divisible by the number of ranks ({world_size})'
            + (f' times --batch-gpu={opts.batch_gpu}' if opts.batch_gpu is not None else ''))
    c.total_kimg = opts.duration * 1000
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)

    # Random seed: given, or drawn on rank 0 and shared.
    c.seed = opts.seed if opts.seed is not None else dist.broadcast_object(int(torch.randint(1 << 31, size=[])))

    # Transfer learning and resume.
    if opts.transfer is not None:
        if opts.resume is not None:
            raise click.ClickException('--transfer and --resume cannot be specified at the same time')
        dist.download_first_on_rank0(opts.transfer) # Once per machine; the other ranks read the cache.
        checkpoint.load_network(opts.transfer, native=False, verbose=(dist.get_rank() == 0)) # Fail now, not after setup.
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        match = re.fullmatch(r'training-state-(\d+)(?:\.\d{3})?\.pt', os.path.basename(opts.resume)) # .NNN: snapshots under 1 kimg apart.
        if not match or not os.path.isfile(opts.resume):
            raise click.ClickException(f'--resume must point to a training-state-*.pt file of a previous run (got {opts.resume})')
        try:
            state = training_loop.read_training_state(opts.resume)
        except Exception as e: # A damaged state fails to unpickle in many ways.
            raise click.ClickException(safety.first_line(e) if isinstance(e, ValueError) else f'Cannot read training state {opts.resume} ({type(e).__name__}: {safety.first_line(e)})')
        saved = state.get('fingerprint') if state.get('format') == training_loop.STATE_FORMAT else None
        if isinstance(state.get('cur_nimg'), int) and state['cur_nimg'] >= c.total_kimg * 1000:
            raise TrainingFinished(f'{opts.resume} is a finished run ({state["cur_nimg"] / 1000:g} kimg of --duration={opts.duration:g} Mimg); '
                'nothing to do (pass a larger --duration to train further)')
        del state
        if saved is not None:
            current = training_loop.training_state_fingerprint(c.network_kwargs, c.loss_kwargs, c.dataset_kwargs, c.get('augment_kwargs'), c.batch_size, interface_kwargs)
            differences = training_loop.fingerprint_differences(saved, current)
            if differences:
                raise click.ClickException(f'--resume {opts.resume} was written with another configuration ({"; ".join(differences[:3])}); '
                    'give the same options as the run that wrote it')
        else: # NVIDIA EDM's state: its EMA lives in the snapshot of the same kimg.
            c.resume_pkl = os.path.join(os.path.dirname(opts.resume), os.path.basename(opts.resume).replace('training-state-', 'network-snapshot-')[:-3] + '.pkl')
            c.resume_kimg = int(match.group(1))
            if not os.path.isfile(c.resume_pkl):
                raise click.ClickException(f'--resume: {opts.resume} is an NVIDIA EDM training state; its EMA network {c.resume_pkl} is missing')
        c.resume_state_dump = opts.resume

    # Run folder, named as NVIDIA EDM names it: NNNNN-digits-16x16-cond-ddpmpp-edm-gpus1-batch128-fp32[-desc].
    name_parts = [dataset_name, ('cond' if c.dataset_kwargs.use_labels else 'uncond'), opts.arch, opts.precond,
        f'gpus{world_size}', f'batch{c.batch_size}', ('fp16' if c.network_kwargs.use_fp16 else 'fp32')]
    name_parts += [] if opts.desc is None else [opts.desc]
    c.run_dir = None # Only rank 0 writes.
    if dist.get_rank() == 0:
        c.run_dir = opts.outdir if opts.nosubdir else next_run_dir(opts.outdir, '-'.join(name_parts))
    return c

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

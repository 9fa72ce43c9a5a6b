"""The options of a training run: train.py's flags turned into the keywords of training_loop(),
checked against the data before anything is written, and the run they start.

    opts = dnnlib.EasyDict(...)   # train.py's options by parameter name.
    training_options.run(opts, device)

train.py and trainMoLRG.py both train through run(); the run folder is NVIDIA EDM's,
{outdir}/{NNNNN}-{dataset}-{cond|uncond}-{arch}-{precond}-gpus{N}-batch{B}-{fp16|fp32}[-{desc}].
"""

import copy
import json
import os
import re

import torch

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training import dataset
from training import training_loop

#----------------------------------------------------------------------------

def next_run_dir(outdir, desc):
    """{outdir}/{NNNNN}-{desc} with NNNNN one more than the largest existing run number."""
    ids = [int(m.group()) for m in (re.match(r'^\d+', x) for x in (os.listdir(outdir) if os.path.isdir(outdir) else [])) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')

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

class OptionsError(Exception):
    """Options that cannot make a training run; the message is one line meant for the user."""

def build_config(opts, device):
    """All training options as the keyword arguments of training_loop().

    opts -- train.py's options by parameter name. OptionsError for options that contradict each
    other or the data; dataset.DatasetError, checkpoint.CheckpointError and training_loop.ResumeError
    from reading the data, --transfer and --resume; training_loop.TrainingFinished for a --resume
    state that already reached --duration.
    """
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
        raise OptionsError(f'--data: dataset not found: {opts.data}')
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
        raise OptionsError(f'{interface_kwargs["img_resolution"]}x{interface_kwargs["img_resolution"]} images cannot be halved '
            f'{len(c.network_kwargs.channel_mult) - 1} times; give fewer --cres levels')
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)

    # Training options.
    world_size = dist.get_world_size()
    if opts.batch % world_size != 0 or (opts.batch_gpu is not None and (opts.batch // world_size) % min(opts.batch_gpu, opts.batch // world_size) != 0):
        raise OptionsError(f'--batch={opts.batch} must be divisible by the number of ranks ({world_size})'
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
            raise OptionsError('--transfer and --resume cannot be specified at the same time')
        dist.download_first_on_rank0(opts.transfer) # Once per machine; the other ranks read the cache.
        checkpoint.load_network(opts.transfer, native=False, verbose=(dist.get_rank() == 0)) # Fail now, not after setup.
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        c.update(training_loop.resume_options(opts.resume, c, interface_kwargs))

    # Run folder, named as NVIDIA EDM names it: NNNNN-digits-16x16-cond-ddpmpp-edm-gpus1-batch128-fp32[-desc].
    name_parts = [dataset_name, ('cond' if c.dataset_kwargs.use_labels else 'uncond'), opts.arch, opts.precond,
        f'gpus{world_size}', f'batch{c.batch_size}', ('fp16' if c.network_kwargs.use_fp16 else 'fp32')]
    name_parts += [] if opts.desc is None else [opts.desc]
    c.run_dir = None # Only rank 0 writes.
    if dist.get_rank() == 0:
        c.run_dir = opts.outdir if opts.nosubdir else next_run_dir(opts.outdir, '-'.join(name_parts))
    return c

#----------------------------------------------------------------------------

def print_options(c, opts, device):
    """All options as JSON, then the few worth a second look before hours of training."""
    summary = {
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

def run(opts, device):
    """Train with train.py's options `opts` on `device` (dist.init's): print the options, and unless
    opts.dry_run, create the run folder and train. Nothing is written before every option is
    checked; OptionsError says what is wrong with them."""
    if device.type == 'cuda':
        torch.multiprocessing.set_start_method('spawn', force=True) # DataLoader workers must not inherit CUDA state.
    try:
        c = build_config(opts, device)
    except (dataset.DatasetError, checkpoint.CheckpointError, training_loop.ResumeError) as e:
        raise OptionsError(str(e)) from e
    except training_loop.TrainingFinished as e:
        dist.print0(str(e))
        return
    print_options(c, opts, device)
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

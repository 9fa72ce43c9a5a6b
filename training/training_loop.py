"""The training loop of EDM (Karras et al. 2022) with exactly resumable state.

One iteration: accumulate gradients of the loss over `batch_gpu`-sized rounds, step Adam with a
learning-rate ramp-up, update an EMA of the weights whose half-life ramps up with training. Once per
tick: log to stats.jsonl and log.txt, and at their intervals write a snapshot pickle in NVIDIA
EDM's format (loadable by its generate.py) and a training state from which --resume continues
bit for bit: weights, EMA, optimizer, every rank's random generators, the data position and the
tick counter are all in it.
"""

import copy
import json
import os
import random
import re
import time
import warnings

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training import checkpoint
from training import safety

STATE_FORMAT = 'exposure-bias-training-state-1'

#----------------------------------------------------------------------------
# Random generator states of this process, for exact resumption.

def get_rng_states(device):
    states = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == 'cuda':
        states['cuda'] = torch.cuda.get_rng_state(device)
    return states

def set_rng_states(states, device):
    torch.set_rng_state(states['torch'])
    np.random.set_state(states['numpy'])
    random.setstate(states['python'])
    if device.type == 'cuda' and 'cuda' in states:
        torch.cuda.set_rng_state(states['cuda'], device)

def gather_objects(obj):
    """List of `obj` from every rank, on every rank."""
    if dist.get_world_size() == 1:
        return [obj]
    objects = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(objects, obj)
    return objects

#----------------------------------------------------------------------------

def training_state_fingerprint(network_kwargs, loss_kwargs, dataset_kwargs, augment_kwargs, batch_size, interface_kwargs):
    """What a training state must agree with to be resumed: a different network, loss, data or
    batch would silently train something else."""
    fingerprint = dict(network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, augment_kwargs=augment_kwargs,
        dataset_path=dataset_kwargs.get('path'), use_labels=dataset_kwargs.get('use_labels'), batch_size=batch_size, **interface_kwargs)
    return json.loads(json.dumps(fingerprint)) # Plain JSON types, as they come back from the state file.

def read_training_state(path):
    """A training state as a dict: ours load without running code (training/safety.py), NVIDIA
    EDM's through the unsafe path after a warning. ValueError with a one-line reason otherwise."""
    state = safety.load_training_state(path, STATE_FORMAT)
    if not isinstance(state, dict) or (state.get('format') != STATE_FORMAT and not {'net', 'optimizer_state'} <= set(state)):
        raise ValueError(f'{path} holds a {type(state).__name__} without "net" and "optimizer_state", not a training state')
    return state

def read_training_state_fingerprint(path):
    """The fingerprint stored in one of our training states, or None for NVIDIA EDM's states."""
    state = read_training_state(path)
    return state.get('fingerprint') if state.get('format') == STATE_FORMAT else None

def fingerprint_differences(saved, current, prefix=''):
    """'network_kwargs.model_channels: 16 in the state, 32 now' for each leaf that differs (dicts are compared key by key)."""
    differences = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += fingerprint_differences(a, b, prefix=f'{prefix}{key}.')
        elif a != b:
            differences.append(f'{prefix}{key}: {a!r} in the state, {b!r} now')
    return differences

class ResumeError(Exception):
    """A --resume state that cannot continue this run; the message is one line meant for the user."""

class TrainingFinished(Exception):
    """A --resume state that already reached the training duration: nothing to train, nothing to write."""

def resume_options(path, config, interface_kwargs):
    """The training_loop() keywords that continue the run of training state `path`: resume_state_dump,
    and for NVIDIA EDM's states also resume_pkl and resume_kimg (its EMA lives in the snapshot of
    the same kimg).

    config -- the training_loop() keywords of this run; one of our states must have been written
    with the same network, loss, data and batch (training_state_fingerprint). ResumeError says why a
    state cannot be resumed, TrainingFinished that it already reached config.total_kimg.
    """
    match = re.fullmatch(r'training-state-(\d+)(?:\.\d{3})?\.pt', os.path.basename(path)) # .NNN: snapshots under 1 kimg apart.
    if not match or not os.path.isfile(path):
        raise ResumeError(f'--resume must point to a training-state-*.pt file of a previous run (got {path})')
    try:
        state = read_training_state(path)
    except Exception as e: # A damaged state fails to unpickle in many ways.
        raise ResumeError(safety.first_line(e) if isinstance(e, ValueError) else f'Cannot read training state {path} ({type(e).__name__}: {safety.first_line(e)})')
    saved = state.get('fingerprint') if state.get('format') == STATE_FORMAT else None
    if isinstance(state.get('cur_nimg'), int) and state['cur_nimg'] >= config.total_kimg * 1000:
        raise TrainingFinished(f'{path} is a finished run ({state["cur_nimg"] / 1000:g} kimg of --duration={config.total_kimg / 1000:g} Mimg); '
            'nothing to do (pass a larger --duration to train further)')
    del state
    options = dnnlib.EasyDict()
    if saved is not None:
        current = training_state_fingerprint(config.network_kwargs, config.loss_kwargs, config.dataset_kwargs, config.get('augment_kwargs'),
            config.batch_size, interface_kwargs)
        differences = fingerprint_differences(saved, current)
        if differences:
            raise ResumeError(f'--resume {path} was written with another configuration ({"; ".join(differences[:3])}); '
                'give the same options as the run that wrote it')
    else:
        options.resume_pkl = os.path.join(os.path.dirname(path), os.path.basename(path).replace('training-state-', 'network-snapshot-')[:-3] + '.pkl')
        options.resume_kimg = int(match.group(1))
        if not os.path.isfile(options.resume_pkl):
            raise ResumeError(f'--resume: {path} is an NVIDIA EDM training state; its EMA network {options.resume_pkl} is missing')
    options.resume_state_dump = path
    return options

def snapshot_name(kind, cur_nimg, interval_nimg, ext):
    """`{kind}-{kimg:06d}{ext}` as EDM names them; when snapshots come less than 1 kimg apart (--tick
    below 1), kimg alone would repeat, so the images past the last kimg are added: 000000.500."""
    kimg = f'{cur_nimg // 1000:06d}'
    if interval_nimg < 1000 and cur_nimg % 1000 != 0:
        kimg += f'.{cur_nimg % 1000:03d}'
    return f'{kind}-{kimg}{ext}'

#----------------------------------------------------------------------------
# The pieces of one optimizer step, in the order the loop applies them.

def accumulation_plan(batch_size, batch_gpu, num_ranks):
    """(images per round, rounds) such that rounds of `batch_gpu` images on each of `num_ranks`
    ranks make up `batch_size`; batch_gpu=None (or too large) means one round per step."""
    per_rank = batch_size // num_ranks
    per_round = per_rank if batch_gpu is None else min(batch_gpu, per_rank)
    rounds = per_rank // per_round
    assert per_round * rounds * num_ranks == batch_size, 'train.py checks that the batch divides evenly'
    return per_round, rounds

def accumulate_gradients(ddp, loss_fn, next_batch, num_rounds, loss_weight, augment_pipe=None, device=None):
    """Add the gradient of `loss_weight` times the summed loss of `num_rounds` batches to .grad.

    `next_batch()` gives (uint8-valued images, labels) as the data loader yields them. Under DDP
    the ranks average their gradients once, in the backward pass of the last round only. With
    loss_weight = loss_scaling / images-per-rank, the step sees the mean per-image loss.
    """
    for index in range(num_rounds):
        images, labels = next_batch()
        model_images = misc.uint8_to_model_range(images.to(device))
        with misc.ddp_sync(ddp, sync=(index + 1 == num_rounds)):
            per_pixel_loss = loss_fn(net=ddp, images=model_images, labels=labels.to(device), augment_pipe=augment_pipe)
            training_stats.report('Loss/loss', per_pixel_loss)
            per_pixel_loss.sum().mul(loss_weight).backward()

def ramped_learning_rate(base_lr, cur_nimg, rampup_kimg):
    """Linear warm-up: base_lr * min(images seen / ramp-up length, 1); no ramp-up when the length is 0."""
    progress = cur_nimg / max(rampup_kimg * 1000, 1e-8)
    return base_lr * min(progress, 1)

def set_learning_rate(optimizer, lr):
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

def replace_nonfinite_gradients(module):
    """In place: NaN gradients become 0 and infinite ones +-1e5, so that one bad batch (float16
    overflow, say) cannot turn the weights and, through them, the EMA into NaN."""
    grads = [param.grad for param in module.parameters() if param.grad is not None]
    for grad in grads:
        torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5, out=grad)

def ema_decay(cur_nimg, batch_size, halflife_kimg, rampup_ratio=None):
    """Per-step EMA factor beta, with which an image's weight halves after `halflife_kimg` thousand
    images: beta = 0.5 ** (batch_size / halflife). EDM (Karras et al. 2022, Appendix F) ramps the
    half-life up with training, halflife = min(halflife_kimg * 1000, rampup_ratio * cur_nimg), so
    that the EMA does not hold on to the random initialization early on; rampup_ratio=None: fixed."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))

@torch.no_grad()
def update_ema(ema, net, beta):
    """ema <- beta * ema + (1 - beta) * net, parameter by parameter (buffers are not averaged)."""
    for averaged, current in zip(ema.parameters(), net.parameters()):
        averaged.copy_(current.detach().lerp(averaged, beta))

def report_progress(figures):
    """Report each (label, name, value, format) to training_stats (so it reaches stats.jsonl) and
    return the progress line 'label value ...'; format 'duration' prints seconds as 1h 02m 03s."""
    parts = []
    for label, name, value, value_format in figures:
        training_stats.report0(name, value)
        text = f'{dnnlib.util.format_time(value):<12s}' if value_format == 'duration' else format(value, value_format)
        parts.append(f'{label} {text}')
    return ' '.join(parts)

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output folder (rank 0 only; None on other ranks).
    dataset_kwargs      = {},       # Arguments of the dataset class (class_name, path, ...).
    data_loader_kwargs  = {},       # Arguments of torch.utils.data.DataLoader.
    network_kwargs      = {},       # Arguments of the preconditioned network (class_name, ...).
    loss_kwargs         = {},       # Arguments of the loss (class_name, ...).
    optimizer_kwargs    = {},       # Arguments of the optimizer (class_name, lr, ...).
    augment_kwargs      = None,     # Arguments of the augmentation pipeline; None = no augmentation.
    seed                = 0,        # Global random seed.
    batch_size          = 512,      # Images per iteration, over all ranks.
    batch_gpu           = None,     # Images per rank and accumulation round; None = batch_size / ranks.
    total_kimg          = 200000,   # Training length in thousands of images.
    ema_halflife_kimg   = 500,      # Half-life of the EMA of the weights.
    ema_rampup_ratio    = 0.05,     # EMA half-life is at most this fraction of the images seen; None = no ramp-up.
    lr_rampup_kimg      = 10000,    # Learning-rate ramp-up length.
    loss_scaling        = 1,        # Loss scale for float16 training (Adam is invariant to it).
    kimg_per_tick       = 50,       # Images between progress lines.
    snapshot_ticks      = 50,       # Ticks between network snapshots; None = none.
    state_dump_ticks    = 500,      # Ticks between training states; None = none.
    resume_pkl          = None,     # Start from the weights of this network snapshot (--transfer).
    resume_state_dump   = None,     # Continue from this training state (--resume).
    resume_kimg         = 0,        # Training progress of an NVIDIA-format training state.
    cudnn_benchmark     = True,     # torch.backends.cudnn.benchmark.
    device              = torch.device('cuda'),
):
    start_time = time.time()
    np.random.seed((seed * dist.get_world_size() + dist.get_rank()) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    random.seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    if device.type == 'cpu':
        # EDM initializes the last layer of every block at 1e-5 scale, and on CPUs (unlike GPUs)
        # the resulting subnormal floats in the backward pass are slow: VP training ran 17x slower.
        torch.set_flush_denormal(True)

    batch_gpu_total = batch_size // dist.get_world_size()
    batch_gpu, num_accumulation_rounds = accumulation_plan(batch_size, batch_gpu, dist.get_world_size())

    # Dataset and network.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
    dist.print0('Constructing network...')
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if dist.get_rank() == 0:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
            sigma = torch.ones([batch_gpu], device=device)
            labels = torch.zeros([batch_gpu, net.label_dim], device=device)
            misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)

    # Loss, optimizer, augmentation, EMA.
    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    ddp = net
    if dist.get_world_size() > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    fingerprint = training_state_fingerprint(network_kwargs, loss_kwargs, dataset_kwargs, augment_kwargs, batch_size, interface_kwargs)

    # Start from a snapshot's weights (--transfer), or continue a training state (--resume).
    cur_nimg = resume_kimg * 1000
    cur_tick = 0
    rng_states = None
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        dist.download_first_on_rank0(resume_pkl)
        source = checkpoint.load_network(resume_pkl, native=False, verbose=(dist.get_rank() == 0))
        misc.copy_params_and_buffers(src_module=source, dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=source, dst_module=ema, require_all=False)
        del source
    if resume_state_dump is not None:
        dist.print0(f'Loading training state from "{resume_state_dump}"...')
        state = read_training_state(resume_state_dump)
        if state.get('format') == STATE_FORMAT:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
            optimizer.load_state_dict(state['optimizer_state'])
            cur_nimg, cur_tick = state['cur_nimg'], state['cur_tick'] + 1
            if len(state['rng_states']) == dist.get_world_size():
                rng_states = state['rng_states'][dist.get_rank()]
            else:
                warnings.warn(f'The training state was written by {len(state["rng_states"])} ranks, this run has {dist.get_world_size()}; '
                    'random draws continue from fresh seeds, so the run is not bit-identical to an uninterrupted one')
        else: # NVIDIA EDM's state: the training network and the optimizer; EMA came from the snapshot (resume_pkl).
            misc.copy_params_and_buffers(src_module=state['net'], dst_module=net, require_all=True)
            optimizer.load_state_dict(state['optimizer_state'])
        del state

    # Data, starting where the consumed images end.
    sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=dist.get_rank(), num_replicas=dist.get_world_size(), seed=seed, start_idx=cur_nimg)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=sampler, batch_size=batch_gpu, **data_loader_kwargs))
    if rng_states is not None:
        set_rng_states(rng_states, device) # Last thing before the loop, so that setup draws do not matter.

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    training_stats.reset() # Nothing reported before this run (e.g. by an earlier run in this process) counts.
    stats_collector = training_stats.Collector(regex='.*')
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    stats_jsonl = None
    while True:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(ddp, loss_fn, lambda: next(dataset_iterator), num_accumulation_rounds,
            loss_weight=loss_scaling / batch_gpu_total, augment_pipe=augment_pipe, device=device)
        set_learning_rate(optimizer, ramped_learning_rate(optimizer_kwargs['lr'], cur_nimg, lr_rampup_kimg))
        replace_nonfinite_gradients(net)
        optimizer.step()
        update_ema(ema, net, ema_decay(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio))

        # The rest runs once per tick (and always after the first step and the last).
        cur_nimg += batch_size
        done = cur_nimg >= total_kimg * 1000
        tick_is_over = cur_tick == 0 or cur_nimg >= tick_start_nimg + kimg_per_tick * 1000
        if not (done or tick_is_over):
            continue

        # Progress line; the same figures go to stats.jsonl.
        tick_end_time = time.time()
        tick_sec = tick_end_time - tick_start_time
        figures = [ # (label, training_stats name, value, format of the value)
            ('tick', 'Progress/tick', cur_tick, '<5d'),
            ('kimg', 'Progress/kimg', cur_nimg / 1e3, '<9.1f'),
            ('time', 'Timing/total_sec', tick_end_time - start_time, 'duration'),
            ('sec/tick', 'Timing/sec_per_tick', tick_sec, '<7.1f'),
            ('sec/kimg', 'Timing/sec_per_kimg', tick_sec / max(cur_nimg - tick_start_nimg, 1) * 1e3, '<7.2f'),
            ('maintenance', 'Timing/maintenance_sec', maintenance_time, '<6.1f'),
            ('cpumem', 'Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30, '<6.2f'),
        ]
        if device.type == 'cuda':
            figures.append(('gpumem', 'Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30, '<6.2f'))
            figures.append(('reserved', 'Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(device) / 2**30, '<6.2f'))
            torch.cuda.reset_peak_memory_stats()
        progress_line = report_progress(figures)
        stats_collector.update()
        dist.print0(f"{progress_line} loss {stats_collector['Loss/loss']:<8.4f}")

        # Network snapshot, in NVIDIA EDM's format.
        if (snapshot_ticks is not None) and (done or cur_tick % snapshot_ticks == 0):
            data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs))
            for key, value in data.items():
                if isinstance(value, torch.nn.Module):
                    value = copy.deepcopy(value).eval().requires_grad_(False)
                    if dist.get_world_size() > 1:
                        misc.check_ddp_consistency(value)
                    data[key] = value.cpu()
            if dist.get_rank() == 0:
                checkpoint.save_snapshot(os.path.join(run_dir, snapshot_name('network-snapshot', cur_nimg, kimg_per_tick * 1000 * snapshot_ticks, '.pkl')), data)
            del data

        # Training state, for --resume.
        if (state_dump_ticks is not None) and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0:
            rng_states = gather_objects(get_rng_states(device))
            if dist.get_rank() == 0:
                state = dict(format=STATE_FORMAT, cur_nimg=cur_nimg, cur_tick=cur_tick, fingerprint=fingerprint,
                    net=net.state_dict(), ema=ema.state_dict(), optimizer_state=optimizer.state_dict(), rng_states=rng_states)
                with dnnlib.util.atomic_write(os.path.join(run_dir, snapshot_name('training-state', cur_nimg, kimg_per_tick * 1000 * state_dump_ticks, '.pt')), fsync=True) as f:
                    torch.save(state, f)
                del state

        # Logs.
        if dist.get_rank() == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
            stats_jsonl.write(json.dumps(dict(stats_collector.as_dict(), timestamp=time.time())) + '\n')
            stats_jsonl.flush()

        if done:
            break
        # The next tick starts now; what this one spent after training (logs, snapshots) is its maintenance.
        tick_start_nimg, tick_start_time, cur_tick = cur_nimg, time.time(), cur_tick + 1
        maintenance_time = tick_start_time - tick_end_time

    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0()
    dist.print0('Exiting...')

#----------------------------------------------------------------------------

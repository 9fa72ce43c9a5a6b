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

def read_training_state_fingerprint(path):
    """The fingerprint stored in one of our training states, or None for NVIDIA EDM's states."""
    state = torch.load(path, map_location=torch.device('cpu'), weights_only=False)
    return state.get('fingerprint') if isinstance(state, dict) and state.get('format') == STATE_FORMAT else None

def fingerprint_differences(saved, current):
    keys = sorted(set(saved) | set(current))
    return [f'{key}: {saved.get(key)!r} in the state, {current.get(key)!r} now' for key in keys if saved.get(key) != current.get(key)]

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

    # Batch per rank and accumulation rounds.
    batch_gpu_total = batch_size // dist.get_world_size()
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    assert batch_size == batch_gpu * num_accumulation_rounds * dist.get_world_size()

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
        state = torch.load(resume_state_dump, map_location=torch.device('cpu'), weights_only=False)
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
        # Accumulate gradients.
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(num_accumulation_rounds):
            with misc.ddp_sync(ddp, (round_idx == num_accumulation_rounds - 1)):
                images, labels = next(dataset_iterator)
                images = images.to(device).to(torch.float32) / 127.5 - 1
                labels = labels.to(device)
                loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
                training_stats.report('Loss/loss', loss)
                loss.sum().mul(loss_scaling / batch_gpu_total).backward()

        # Update the weights.
        for group in optimizer.param_groups:
            group['lr'] = optimizer_kwargs['lr'] * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()

        # Update the EMA.
        ema_halflife_nimg = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))

        # Once per tick from here on.
        cur_nimg += batch_size
        done = (cur_nimg >= total_kimg * 1000)
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        # Progress line; the same figures go to stats.jsonl.
        tick_end_time = time.time()
        report0 = training_stats.report0
        fields = []
        fields += [f"tick {report0('Progress/tick', cur_tick):<5d}"]
        fields += [f"kimg {report0('Progress/kimg', cur_nimg / 1e3):<9.1f}"]
        fields += [f"time {dnnlib.util.format_time(report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]
        fields += [f"sec/tick {report0('Timing/sec_per_tick', tick_end_time - tick_start_time):<7.1f}"]
        fields += [f"sec/kimg {report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3):<7.2f}"]
        fields += [f"maintenance {report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
        fields += [f"cpumem {report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
        if device.type == 'cuda':
            fields += [f"gpumem {report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}"]
            fields += [f"reserved {report0('Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(device) / 2**30):<6.2f}"]
            torch.cuda.reset_peak_memory_stats()
        stats_collector.update()
        fields += [f"loss {stats_collector['Loss/loss']:<8.4f}"]
        dist.print0(' '.join(fields))

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
                checkpoint.save_snapshot(os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pkl'), data)
            del data

        # Training state, for --resume.
        if (state_dump_ticks is not None) and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0:
            rng_states = gather_objects(get_rng_states(device))
            if dist.get_rank() == 0:
                state = dict(format=STATE_FORMAT, cur_nimg=cur_nimg, cur_tick=cur_tick, fingerprint=fingerprint,
                    net=net.state_dict(), ema=ema.state_dict(), optimizer_state=optimizer.state_dict(), rng_states=rng_states)
                with dnnlib.util.atomic_write(os.path.join(run_dir, f'training-state-{cur_nimg // 1000:06d}.pt'), fsync=True) as f:
                    torch.save(state, f)
                del state

        # Logs.
        if dist.get_rank() == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
            stats_jsonl.write(json.dumps(dict(stats_collector.as_dict(), timestamp=time.time())) + '\n')
            stats_jsonl.flush()

        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0()
    dist.print0('Exiting...')

#----------------------------------------------------------------------------

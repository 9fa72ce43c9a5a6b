"""Process-group setup for scripts launched with `torchrun` or as a plain single process.

Under torchrun the rank and world size come from RANK / WORLD_SIZE / LOCAL_RANK; the backend is
NCCL when the script runs on CUDA and Gloo otherwise, so a CPU-only machine can run several ranks.
Unlaunched, no process group is created at all and every collective here is a no-op.
"""

import os

import torch

#----------------------------------------------------------------------------

def init(device=None):
    """Join the torchrun process group (if launched by torchrun) and return the device to use.

    `device` is 'cuda', 'cpu' or None for CUDA when available. Each rank gets cuda:LOCAL_RANK.
    """
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError('CUDA was requested but is not available; pass --device=cpu')
        device = torch.device('cuda', get_local_rank())
        torch.cuda.set_device(device)
    if _launched() and not torch.distributed.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        init_kwargs = dict(backend=backend, init_method='env://')
        if backend == 'nccl':
            init_kwargs['device_id'] = device
        torch.distributed.init_process_group(**init_kwargs)
    return device

def _launched():
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ

def launched_world_size():
    """How many processes torchrun started (1 when not launched), known before any process group exists."""
    return int(os.environ['WORLD_SIZE']) if _launched() else 1

def is_initialized():
    return torch.distributed.is_available() and torch.distributed.is_initialized()

def get_rank():
    return torch.distributed.get_rank() if is_initialized() else 0

def get_world_size():
    return torch.distributed.get_world_size() if is_initialized() else 1

def get_local_rank():
    return int(os.environ.get('LOCAL_RANK', '0'))

def barrier():
    if is_initialized():
        torch.distributed.barrier()

def all_reduce_sum(tensor):
    """Sum `tensor` in place over all ranks (identity when there is a single process)."""
    if is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor

def broadcast_object(obj, src=0):
    """Return rank `src`'s copy of a picklable object on every rank."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]

def shutdown():
    if is_initialized():
        torch.distributed.destroy_process_group()

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

#----------------------------------------------------------------------------

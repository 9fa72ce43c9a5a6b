"""Process-group setup for scripts launched with `torchrun` or as a plain single process.

Under torchrun the rank and world size come from RANK / WORLD_SIZE / LOCAL_RANK; the backend is
NCCL when the script runs on CUDA and Gloo otherwise, so a CPU-only machine can run several ranks.
Unlaunched, no process group is created at all and every collective here is a no-op.
"""

import datetime
import os

import torch

import dnnlib

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

#----------------------------------------------------------------------------
# Downloads happen once per machine: local rank 0 fills the download cache while the other ranks
# wait, then every rank loads in parallel (from the cache). Only the download is serialized;
# reading a data set or building a network is each rank's own work and runs at the same time.
# The wait runs on its own Gloo group with a timeout sized for a large file over a slow link
# (NCCL's collective timeout, 10 minutes, would abort the waiting ranks during a 2 GB download).

DOWNLOAD_TIMEOUT = datetime.timedelta(hours=3)
_download_group = None

def _wait_for_downloads():
    global _download_group
    if _download_group is None:
        _download_group = torch.distributed.new_group(backend='gloo', timeout=DOWNLOAD_TIMEOUT)
    torch.distributed.barrier(group=_download_group)

def download_first_on_rank0(*paths):
    """Fetch the URLs among `paths` into the download cache on local rank 0 of each machine, while
    the other ranks wait; local paths and None are skipped. Collective: every rank calls it with the
    same paths. A failed download is not raised here: every rank then tries the file itself and
    reports the failure with the loader's own message."""
    urls = [path for path in paths if isinstance(path, str) and dnnlib.util.is_url(path)]
    if not urls or get_world_size() == 1:
        return
    if get_local_rank() == 0:
        for url in urls:
            try:
                dnnlib.util.open_url(url, return_filename=True, verbose=(get_rank() == 0))
            except Exception: # Reported by every rank when it loads the file.
                pass
    _wait_for_downloads()

#----------------------------------------------------------------------------

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

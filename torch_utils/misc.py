"""Small tensor and module utilities used across training and sampling."""

import contextlib
import re

import numpy as np
import torch

#----------------------------------------------------------------------------
# Cached constant tensors. Pickled augmentation pipelines from NVIDIA EDM call
# `torch_utils.misc.constant` at run time, so the name and signature are fixed.

_constant_cache = {}

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.device('cpu')
    memory_format = memory_format if memory_format is not None else torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = tensor.broadcast_to(shape)
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

#----------------------------------------------------------------------------
# Parameters and buffers.

def params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every tensor of `src_module` into the tensor of the same name in `dst_module`.

    With require_all, a name of `dst_module` missing from `src_module` is an error; shapes must
    always agree.
    """
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            if require_all:
                raise KeyError(f'Source module has no parameter or buffer "{name}"')
            continue
        src = src_tensors[name]
        if src.shape != tensor.shape:
            raise ValueError(f'Shape mismatch for "{name}": source {tuple(src.shape)}, destination {tuple(tensor.shape)}')
        tensor.copy_(src)

#----------------------------------------------------------------------------
# DistributedDataParallel helpers.

@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip DDP's gradient all-reduce for all but the last accumulation round."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield

def check_ddp_consistency(module, ignore_regex=None):
    """Assert that every rank holds the same parameters and buffers (NaN counts as equal)."""
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        assert (tensor == other).all(), f'Parameter differs across ranks: {fullname}'

#----------------------------------------------------------------------------
# Endless sampler over a dataset. The stream is a sequence of epochs, each a
# permutation drawn from (seed, epoch); rank r of R takes stream positions
# r, r + R, r + 2R, ... Any position can be started from in O(1), which is
# what lets a resumed training run see exactly the images it would have seen.

class InfiniteSampler(torch.utils.data.Sampler):
    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start_idx=0):
        assert len(dataset) > 0
        assert num_replicas > 0 and 0 <= rank < num_replicas
        super().__init__()
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx # Global stream position to start at (images consumed by all ranks so far).

    def epoch_order(self, epoch):
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.RandomState([self.seed % (1 << 31), epoch % (1 << 31)]).permutation(self.dataset_size)

    def __iter__(self):
        position = self.start_idx + (self.rank - self.start_idx) % self.num_replicas # First position of this rank.
        epoch, order = None, None
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = self.epoch_order(epoch)
            yield int(order[position % self.dataset_size])
            position += self.num_replicas

#----------------------------------------------------------------------------

def print_module_summary(module, inputs, max_nesting=3):
    """Print a table of submodules with their parameter counts and output shapes; returns outputs."""
    assert isinstance(module, torch.nn.Module)
    rows = []
    hooks = []
    depth = [0]

    def pre_hook(_mod, _inputs):
        depth[0] += 1

    def post_hook(mod, _inputs, outputs):
        depth[0] -= 1
        if depth[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            shapes = [str(list(t.shape)) for t in outputs if isinstance(t, torch.Tensor)]
            rows.append((mod, shapes))

    for mod in module.modules():
        hooks.append(mod.register_forward_pre_hook(pre_hook))
        hooks.append(mod.register_forward_hook(post_hook))
    outputs = module(*inputs)
    for hook in hooks:
        hook.remove()

    names = {mod: name for name, mod in module.named_modules()}
    table = [('Module', 'Parameters', 'Output shape')]
    for mod, shapes in rows:
        num_params = sum(p.numel() for p in mod.parameters(recurse=False))
        if num_params == 0 and len(list(mod.children())) > 0:
            continue
        table.append((names.get(mod, '?') or '<top-level>', str(num_params) if num_params else '-', ', '.join(shapes) or '-'))
    table.append(('Total', str(sum(p.numel() for p in module.parameters())), ''))
    widths = [max(len(row[c]) for row in table) for c in range(3)]
    for row in table:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------

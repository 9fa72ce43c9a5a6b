"""Small tensor and module utilities used across training and sampling: cached constants, the
parameters, buffers and device of a module, uint8 <-> [-1, 1] image values, DDP helpers, the
resumable infinite sampler and a module summary."""

import contextlib
import re

import numpy as np
import torch

#----------------------------------------------------------------------------
# Cached constant tensors. Pickled augmentation pipelines from NVIDIA EDM call
# `torch_utils.misc.constant` at run time, so the name and signature are fixed.

_constant_cache = {}

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """`value` as a tensor (broadcast to `shape` if given), built once per distinct value, shape,
    dtype, device and memory format and then shared: augmentation calls it on every batch."""
    value = np.asarray(value)
    shape = None if shape is None else tuple(shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu' if device is None else device)
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    key = (value.tobytes(), value.dtype, value.shape, shape, dtype, device, memory_format)
    if key not in _constant_cache:
        made = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        made = made if shape is None else made.broadcast_to(shape)
        _constant_cache[key] = made.contiguous(memory_format=memory_format)
    return _constant_cache[key]

#----------------------------------------------------------------------------
# Parameters and buffers.

def named_params_and_buffers(module):
    """[(name, tensor)] of every parameter of `module`, then of every buffer: all a state_dict holds
    apart from extra state."""
    return [*module.named_parameters(), *module.named_buffers()]

def params_and_buffers(module):
    return [tensor for _name, tensor in named_params_and_buffers(module)]

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

def module_device(module, default=torch.device('cpu')):
    """The device of the first parameter of `module` (else of its first buffer); `default` for a
    module that holds neither."""
    for tensor in params_and_buffers(module):
        return tensor.device
    return torch.device(default)

#----------------------------------------------------------------------------
# Image values. Datasets and image files hold uint8 pixels 0..255; networks see [-1, 1].

def uint8_to_model_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or uint8-valued) images -> `dtype` values in [-1, 1]: x / 127.5 - 1, in that order.
    TorchScript-compatible, so that exported detectors can call it."""
    return images.to(dtype) / 127.5 - 1

def model_range_to_uint8(images):
    """[-1, 1] images -> uint8 0..255, rounded to nearest as EDM rounds: x * 127.5 + 128, clipped, truncated."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
# DistributedDataParallel helpers.

@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip DDP's gradient all-reduce for all but the last accumulation round."""
    skip_all_reduce = isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync
    with module.no_sync() if skip_all_reduce else contextlib.nullcontext():
        yield

def check_ddp_consistency(module, ignore_regex=None):
    """Assert that every rank holds the same parameters and buffers as rank 0 (NaN counts as equal),
    leaving out those whose 'ClassName.param.name' matches `ignore_regex`."""
    for name, tensor in named_params_and_buffers(module):
        qualified_name = f'{type(module).__name__}.{name}'
        if ignore_regex is None or not re.fullmatch(ignore_regex, qualified_name):
            local = tensor.detach()
            local = torch.nan_to_num(local) if local.is_floating_point() else local
            from_rank0 = local.clone()
            torch.distributed.broadcast(tensor=from_rank0, src=0)
            assert torch.equal(local, from_rank0), f'Parameter differs across ranks: {qualified_name}'

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
    """Run module(*inputs) once and print a table of its calls: for every submodule at most
    `max_nesting` levels below `module`, in the order the calls return, the parameters it holds
    and the shapes it returned. Parameters of deeper submodules count in their ancestor's row at
    the deepest level shown. Returns the outputs."""
    # A module's level is that of the call that runs it: the children of a ModuleDict or ModuleList,
    # which forward() never calls, sit at the container's own level.
    depths, names = {}, {}
    for name, mod in module.named_modules(): # Parents come before their children.
        parent_name, _, _ = name.rpartition('.')
        parent = module.get_submodule(parent_name) if name else None
        is_container = isinstance(parent, (torch.nn.ModuleDict, torch.nn.ModuleList))
        depths[mod] = 0 if parent is None else depths[parent] + (0 if is_container else 1)
        names[mod] = name or '<top-level>'
    calls = [] # (submodule, shapes of the tensors it returned)

    def record_call(mod, _inputs, outputs):
        returned = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        calls.append((mod, [list(t.shape) for t in returned if isinstance(t, torch.Tensor)]))

    handles = [mod.register_forward_hook(record_call) for mod, depth in depths.items() if depth <= max_nesting]
    try:
        outputs = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    table = [('Module', 'Parameters', 'Output shape')]
    for mod, shapes in calls:
        deepest_shown = depths[mod] == max_nesting
        num_params = sum(p.numel() for p in mod.parameters(recurse=deepest_shown))
        if num_params == 0 and not deepest_shown and next(mod.children(), None) is not None:
            continue # A container without weights of its own; its children have rows.
        table.append((names[mod], str(num_params) if num_params else '-', ', '.join(map(str, shapes)) or '-'))
    table.append(('Total', str(sum(p.numel() for p in module.parameters())), ''))
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    for row in table:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------

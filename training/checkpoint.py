"""Reading and writing network pickles in NVIDIA EDM's format.

A snapshot is a pickled dict ({'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs':
...}) whose objects carry the source of their defining module (torch_utils.persistence). Loading
executes that embedded source, so by default the loaded network is then rebuilt on this codebase's
own classes from its recorded constructor arguments: same state_dict, same outputs, and code that
works with torch.func and any later fixes. Networks of classes we do not have stay as pickled,
with a warning.
"""

import pickle
import warnings

import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence
from training import networks
from training import safety

#----------------------------------------------------------------------------

class CheckpointError(Exception):
    """A network file that cannot be used; the message is meant for the user as is."""

# Classes that pickled networks are rebuilt on, by their pickled class name.
NATIVE_CLASSES = {name: getattr(networks, name) for name in [
    'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond', 'SongUNet', 'DhariwalUNet',
]}

def register_native_class(cls):
    """Let pickles of `cls.__name__` be rebuilt on `cls` (for classes defined outside networks.py)."""
    NATIVE_CLASSES[cls.__name__] = cls
    return cls

#----------------------------------------------------------------------------

def load_snapshot(path_or_url, verbose=True):
    """Unpickle a snapshot dict from a local path or URL; CheckpointError on anything unusable."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            safety.warn_code_executes(path_or_url, 'network pickle')
            data = pickle.load(f)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise CheckpointError(f'Network file not found: {path_or_url}') from e
    except dnnlib.util.DownloadError as e:
        raise CheckpointError(str(e)) from e
    except Exception as e: # Corrupt bytes fail in many ways (bad opcodes, bad source, missing names).
        raise CheckpointError(f'{path_or_url} is not a readable network pickle ({type(e).__name__}: {e}); is the file complete?') from e
    if not isinstance(data, dict):
        raise CheckpointError(f'{path_or_url} holds a {type(data).__name__}, not a snapshot dict with an "ema" network')
    return data

def load_network(path_or_url, key='ema', native=True, verbose=True):
    """Load `snapshot[key]` from an EDM-format pickle, rebuilt on our classes when `native`."""
    data = load_snapshot(path_or_url, verbose=verbose)
    if key not in data:
        raise CheckpointError(f'{path_or_url} has no "{key}" entry (it has: {", ".join(map(str, data.keys())) or "nothing"})')
    net = data[key]
    if not isinstance(net, torch.nn.Module):
        raise CheckpointError(f'"{key}" in {path_or_url} is a {type(net).__name__}, not a network')
    return to_native(net) if native else net

#----------------------------------------------------------------------------

def to_native(net):
    """Rebuild a pickled network on this codebase's class of the same name, or return it as is.

    The copy must match exactly: same state_dict names and shapes, nothing missing either way.
    """
    name = type(net).__name__
    cls = NATIVE_CLASSES.get(name, None)
    if cls is None or not persistence.is_persistent(net):
        warnings.warn(f'No native class for pickled network "{name}"; using the code embedded in the pickle', stacklevel=2)
        return net
    if isinstance(net, cls):
        return net
    try:
        with torch.random.fork_rng(devices=[]): # Constructors draw initial weights; keep the caller's RNG untouched.
            native = cls(*net.init_args, **net.init_kwargs)
        src_state = net.state_dict()
        dst_state = native.state_dict()
        if set(src_state) != set(dst_state):
            missing = sorted(set(dst_state) - set(src_state))[:3]
            extra = sorted(set(src_state) - set(dst_state))[:3]
            raise ValueError(f'state_dict keys differ (missing {missing}, unexpected {extra})')
        misc.copy_params_and_buffers(net, native, require_all=True)
    except Exception as e: # Any mismatch means the pickled code is the only faithful version.
        warnings.warn(f'Could not rebuild pickled "{name}" on native classes ({e}); using the code embedded in the pickle', stacklevel=2)
        return net
    native.train(net.training)
    for src, dst in zip(net.parameters(), native.parameters()):
        dst.requires_grad_(src.requires_grad)
    return native.to(next(iter(misc.params_and_buffers(net))).device)

#----------------------------------------------------------------------------

def save_snapshot(path, data):
    """Pickle a snapshot dict to `path` atomically."""
    with dnnlib.util.atomic_write(path, fsync=True) as f:
        pickle.dump(data, f)

#----------------------------------------------------------------------------

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
# Re-export: write a snapshot again with this codebase's classes, hence with this
# codebase's source embedded, and the same weights. The bundled network was
# made this way (bundled/README.md):
#
#     python -m training.checkpoint --src=old.pkl --dest=new.pkl

# Modules whose persistent classes a re-exported snapshot is rebuilt on, by class name.
REEXPORT_MODULES = ['training.networks', 'training.loss', 'training.augment']

def _current_class(name):
    import importlib
    for module_name in REEXPORT_MODULES:
        cls = getattr(importlib.import_module(module_name), name, None)
        if cls is not None and persistence.is_persistent(cls):
            return cls
    return None

def _probe_outputs(net):
    """Outputs of a denoiser on fixed inputs, to show that a rebuilt copy computes the same function."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=g)
    labels = torch.eye(net.label_dim)[[0, net.label_dim - 1]] if net.label_dim else None
    with torch.no_grad():
        return net(x * 3, torch.tensor([0.05, 5.0]), labels)

def with_current_classes(obj):
    """`obj` rebuilt on the class of its name in REEXPORT_MODULES; CheckpointError if that changes it.

    Networks must come out with the same state_dict and bit-identical outputs on probe inputs;
    other objects (loss, augmentation pipe) with the same attributes. Non-persistent values are
    returned as they are.
    """
    if not persistence.is_persistent(obj):
        return obj
    name = type(obj).__name__
    cls = _current_class(name)
    if cls is None:
        raise CheckpointError(f'No class "{name}" in {", ".join(REEXPORT_MODULES)} to re-export the pickled one on')
    if isinstance(obj, torch.nn.Module):
        with warnings.catch_warnings():
            warnings.simplefilter('error') # to_native falls back with a warning: here that is a failure.
            try:
                rebuilt = to_native(obj)
            except Warning as e:
                raise CheckpointError(f'Cannot re-export "{name}": {e}') from e
        if type(rebuilt) is not cls or not torch.equal(_probe_outputs(rebuilt), _probe_outputs(obj)):
            raise CheckpointError(f'Re-exported "{name}" does not compute the pickled function')
        return rebuilt
    with torch.random.fork_rng(devices=[]):
        rebuilt = cls(*obj.init_args, **obj.init_kwargs)
    if vars(rebuilt).keys() != vars(obj).keys() or any(repr(vars(rebuilt)[k]) != repr(vars(obj)[k]) for k in vars(obj)):
        raise CheckpointError(f'Re-exported "{name}" has different attributes from the pickled one')
    return rebuilt

def reexport_snapshot(src, dest):
    """Load the snapshot `src` and write it to `dest` (atomically; may be `src`) on current classes."""
    data = load_snapshot(src, verbose=False)
    save_snapshot(dest, {key: with_current_classes(value) for key, value in data.items()})

def main():
    import click

    @click.command()
    @click.option('--src',  help='Snapshot to read', metavar='PKL', type=str, required=True)
    @click.option('--dest', help='Where to write it (may be --src)', metavar='PKL', type=str, required=True)
    def reexport(src, dest):
        """Write a network snapshot again with this codebase's classes and source, same weights.

        Example: python -m training.checkpoint --src=bundled/edm-digits-16x16.pkl --dest=bundled/edm-digits-16x16.pkl
        """
        try:
            reexport_snapshot(src, dest)
        except CheckpointError as e:
            raise click.ClickException(str(e))
        print(f'Wrote {dest}')

    reexport()

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Reading and writing network pickles in NVIDIA EDM's format.

A snapshot is a pickled dict ({'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs':
...}) whose objects carry the source of their defining module (torch_utils.persistence). Loading
executes that embedded source, so by default the loaded network is then rebuilt on this codebase's
own classes from its recorded constructor arguments: same state_dict, same outputs, and code that
works with torch.func and any later fixes. Networks of classes we do not have stay as pickled,
with a warning.

A weights-only network file (`save_weights_only`, or `python -m training.checkpoint --weights-only`)
holds the same network as plain data: class name, constructor arguments and state_dict, read with
torch.load(weights_only=True) and rebuilt on our classes, so loading it runs no code from the file.
`load_network` takes either kind, told apart by the file's first bytes.
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
        raise CheckpointError(f'{path_or_url} is not a readable network pickle ({type(e).__name__}: {safety.first_line(e)}); is the file complete?') from e
    if not isinstance(data, dict):
        raise CheckpointError(f'{path_or_url} holds a {type(data).__name__}, not a snapshot dict with an "ema" network')
    return data

def load_network(path_or_url, key='ema', native=True, verbose=True):
    """Load `snapshot[key]` from an EDM-format pickle, rebuilt on our classes when `native`, or the
    network of a weights-only file (which is always on our classes, and holds the 'ema' network only)."""
    if is_weights_only_file(path_or_url, verbose=verbose):
        if key != 'ema':
            raise CheckpointError(f'{path_or_url} is a weights-only network file; it holds the "ema" network only, not "{key}"')
        return load_weights_only(path_or_url, verbose=verbose)
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
    return native.to(misc.module_device(net))

#----------------------------------------------------------------------------

def save_snapshot(path, data):
    """Pickle a snapshot dict to `path` atomically."""
    with dnnlib.util.atomic_write(path, fsync=True) as f:
        pickle.dump(data, f)

#----------------------------------------------------------------------------
# Weights-only network files: a torch.save of plain data, loaded with weights_only=True.
#
#     {'format': WEIGHTS_ONLY_FORMAT, 'version': 1, 'class_name': 'EDMPrecond',
#      'init_args': [...], 'init_kwargs': {...}, 'state_dict': {name: tensor},
#      'metadata': {'dataset_kwargs': {...}}}
#
# Only the classes below can be named, and a preconditioner's inner model only by the names
# networks._setup builds it from, so the file chooses which of our constructors runs, never code.

WEIGHTS_ONLY_FORMAT = 'edm-exposure-bias/weights-only-network'
WEIGHTS_ONLY_VERSION = 1
WEIGHTS_ONLY_CLASSES = ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond', 'SongUNet', 'DhariwalUNet']
WEIGHTS_ONLY_MODEL_TYPES = ['SongUNet', 'DhariwalUNet']

def _plain(value, where):
    """`value` as None/bool/int/float/str and lists, tuples and str-keyed dicts of them (EasyDict -> dict)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, f'{where}[{i}]') for i, item in enumerate(value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f'{where}.{k}') for k, v in value.items()}
    raise CheckpointError(f'{where} is a {type(value).__name__}; a weights-only file holds plain values only')

def save_weights_only(path, net, metadata=None):
    """Write `net` (one of WEIGHTS_ONLY_CLASSES, built here or loaded) as a weights-only file, atomically."""
    name = type(net).__name__
    if name not in WEIGHTS_ONLY_CLASSES or not persistence.is_persistent(net):
        raise CheckpointError(f'Cannot write "{name}" as a weights-only file; only {", ".join(WEIGHTS_ONLY_CLASSES)} can be')
    data = dict(format=WEIGHTS_ONLY_FORMAT, version=WEIGHTS_ONLY_VERSION, class_name=name,
        init_args=list(_plain(tuple(net.init_args), 'init_args')), init_kwargs=_plain(dict(net.init_kwargs), 'init_kwargs'),
        state_dict={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        metadata=_plain(dict(metadata or {}), 'metadata'))
    with dnnlib.util.atomic_write(path, fsync=True) as f:
        torch.save(data, f)

def is_weights_only_file(path_or_url, verbose=False):
    """Is this a torch.save zip (rather than a pickle)? Its first bytes say, without loading it."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            return f.read(4) == b'PK\x03\x04'
    except Exception: # Missing, unreadable or not downloadable: load_snapshot says so in its words.
        return False

def _check_weights_only_data(data, where):
    """The class to build and its arguments, or CheckpointError naming what is wrong with the file."""
    not_ours = f'{where} is a torch.save file but not a weights-only network of this codebase'
    if not isinstance(data, dict) or data.get('format') != WEIGHTS_ONLY_FORMAT:
        raise CheckpointError(f'{not_ours} (no "format": "{WEIGHTS_ONLY_FORMAT}" entry); make one with python -m training.checkpoint --weights-only')
    if data.get('version') != WEIGHTS_ONLY_VERSION:
        raise CheckpointError(f'{where} is a weights-only network file of version {data.get("version")!r}; this code reads version {WEIGHTS_ONLY_VERSION}')
    name = data.get('class_name')
    if name not in WEIGHTS_ONLY_CLASSES:
        raise CheckpointError(f'{where} names class {name!r}; a weights-only file may name {", ".join(WEIGHTS_ONLY_CLASSES)} only')
    args, kwargs, state = data.get('init_args'), data.get('init_kwargs'), data.get('state_dict')
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not isinstance(state, dict):
        raise CheckpointError(f'{not_ours} (init_args, init_kwargs or state_dict missing or of the wrong type)')
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f'{not_ours} (state_dict holds something other than named tensors)')
    model_type = kwargs.get('model_type', None)
    if model_type is not None and model_type not in WEIGHTS_ONLY_MODEL_TYPES:
        raise CheckpointError(f'{where} names model_type {model_type!r}; a weights-only file may name {", ".join(WEIGHTS_ONLY_MODEL_TYPES)} only')
    return getattr(networks, name), list(_plain(list(args), 'init_args')), _plain(kwargs, 'init_kwargs'), state

def _refused_global(error):
    """' (GLOBAL posix.system)' from torch's weights_only refusal, whose first line advises the unsafe load."""
    import re
    match = re.search(r'GLOBAL ([\w.]+)', str(error))
    return f' (GLOBAL {match.group(1)})' if match else ''

# Preconditionings whose constructors compute with tensor values, which meta tensors do not have.
# Built on meta they fail, and iDDPMPrecond only after its 1000-level schedule, seconds of meta ops.
_PRECONDS_READING_VALUES = ('VPPrecond', 'iDDPMPrecond')

def _check_arguments_fit_state(cls, args, kwargs, state):
    """Build on the meta device first, so that wrong (or huge) arguments fail at no memory cost.

    For the preconditionings whose constructors read tensor values (_PRECONDS_READING_VALUES, or
    any that fails on meta), the inner model alone is built on meta and must not be much larger
    than the file's tensors.
    """
    def meta_state(build):
        with torch.device('meta'), torch.random.fork_rng(devices=[]):
            return {k: v.shape for k, v in build().state_dict().items()}
    shapes = None
    if cls.__name__ not in _PRECONDS_READING_VALUES:
        try:
            shapes = meta_state(lambda: cls(*args, **kwargs))
        except RuntimeError: # Another constructor that reads tensor values.
            pass
    if shapes is None:
        import inspect
        signature = inspect.signature(cls.__bases__[0]) # The persistent subclass's own __init__ takes (*args, **kwargs).
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        settings = dict(bound.arguments)
        model_kwargs = settings.pop(next(k for k, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), {})
        shapes = meta_state(lambda: getattr(networks, settings['model_type'])(img_resolution=settings['img_resolution'],
            in_channels=settings['img_channels'], out_channels=settings['img_channels'], label_dim=settings['label_dim'], **model_kwargs))
        numel = lambda shapes: sum(torch.Size(shape).numel() for shape in shapes)
        if numel(shapes.values()) > 2 * numel(v.shape for v in state.values()) + (1 << 20):
            raise ValueError('state_dict does not match the constructor arguments (they build a much larger network)')
        return
    if shapes != {k: v.shape for k, v in state.items()}:
        missing, extra = sorted(set(shapes) - set(state))[:3], sorted(set(state) - set(shapes))[:3]
        detail = f'missing {missing}, unexpected {extra}' if missing or extra else 'tensor shapes differ'
        raise ValueError(f'state_dict does not match the constructor arguments ({detail})')

def load_weights_only(path_or_url, verbose=True, return_metadata=False):
    """The network of a weights-only file on our classes (eval mode, no gradients), strictly matching
    its state_dict; with `return_metadata`, (net, metadata). CheckpointError on anything unusable."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            data = torch.load(f, map_location=torch.device('cpu'), weights_only=True)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise CheckpointError(f'Network file not found: {path_or_url}') from e
    except dnnlib.util.DownloadError as e:
        raise CheckpointError(str(e)) from e
    except pickle.UnpicklingError as e: # What weights_only=True says of any object that is not plain data.
        raise CheckpointError(f'{path_or_url} holds objects other than tensors and plain values{_refused_global(e)}; refusing to load it') from e
    except Exception as e:
        raise CheckpointError(f'{path_or_url} is not a readable torch.save file ({type(e).__name__}: {safety.first_line(e)}); is the file complete?') from e
    cls, args, kwargs, state = _check_weights_only_data(data, path_or_url)
    try:
        _check_arguments_fit_state(cls, args, kwargs, state)
        with torch.random.fork_rng(devices=[]): # Constructors draw initial weights; keep the caller's RNG untouched.
            net = cls(*args, **kwargs)
        net.load_state_dict(state, strict=True)
    except Exception as e: # Bad arguments fail in the constructors in many ways (TypeError, KeyError, AssertionError).
        raise CheckpointError(f'{path_or_url}: cannot build "{cls.__name__}" from its recorded arguments ({type(e).__name__}: {safety.first_line(e)})') from e
    net.eval().requires_grad_(False)
    metadata = data.get('metadata') if isinstance(data.get('metadata'), dict) else {}
    return (net, metadata) if return_metadata else net

def convert_to_weights_only(src, dest):
    """Write the 'ema' network of snapshot `src` as a weights-only file `dest`, with its dataset_kwargs;
    CheckpointError unless the written file loads back to a network with bit-identical outputs."""
    if is_weights_only_file(src):
        net, metadata = load_weights_only(src, verbose=False, return_metadata=True)
        save_weights_only(dest, net, metadata) # Written again by this code (e.g. to bring it to the current version).
        return
    data = load_snapshot(src, verbose=False)
    if not isinstance(data.get('ema'), torch.nn.Module):
        raise CheckpointError(f'{src} has no "ema" network')
    with warnings.catch_warnings():
        warnings.simplefilter('error') # A network we cannot rebuild on our classes cannot be written without code.
        try:
            net = to_native(data['ema'])
        except Warning as e:
            raise CheckpointError(f'Cannot write {src} as weights only: {e}') from e
    metadata = {}
    if isinstance(data.get('dataset_kwargs'), dict):
        try:
            metadata['dataset_kwargs'] = _plain(dict(data['dataset_kwargs']), 'dataset_kwargs')
        except CheckpointError:
            pass # Optional information; a value we cannot write as plain data is left out.
    save_weights_only(dest, net, metadata)
    if not torch.equal(_probe_outputs(load_weights_only(dest, verbose=False)), _probe_outputs(data['ema'])):
        raise CheckpointError(f'{dest} does not compute the function of {src}') # Never expected; checked because it is cheap.

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
    if is_weights_only_file(src):
        raise CheckpointError(f'{src} is a weights-only network file; re-export reads a snapshot pickle (convert one with --weights-only)')
    data = load_snapshot(src, verbose=False)
    save_snapshot(dest, {key: with_current_classes(value) for key, value in data.items()})

def main():
    import click

    @click.command()
    @click.option('--src',  help='Snapshot to read', metavar='PKL', type=str, required=True)
    @click.option('--dest', help='Where to write it (may be --src)', metavar='PKL|PT', type=str, required=True)
    @click.option('--weights-only', 'weights_only', help='Write the EMA network as a weights-only .pt (loads without running code)', is_flag=True)
    def reexport(src, dest, weights_only):
        """Write a network snapshot again with this codebase's classes and source, same weights;
        or, with --weights-only, its EMA network as a file that any --network loads without running code.

        Examples: python -m training.checkpoint --src=bundled/edm-digits-16x16.pkl --dest=bundled/edm-digits-16x16.pkl

        python -m training.checkpoint --weights-only --src=network-snapshot-000300.pkl --dest=net.pt
        """
        from training import cli_checks
        cli_checks.output_file(dest, '--dest')
        try:
            (convert_to_weights_only if weights_only else reexport_snapshot)(src, dest)
        except CheckpointError as e:
            raise click.ClickException(str(e))
        print(f'Wrote {dest}')

    reexport()

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

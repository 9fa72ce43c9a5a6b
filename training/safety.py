"""Which files may run code when loaded, and the loaders that make sure the others cannot.

Code executes when loading:
  - network pickles (EDM's format: `torch_utils.persistence` embeds and runs module source), as
    --network, --transfer and NVIDIA-format --resume states;
  - pickled detector modules (--detector, sscd.py --model when the file is not TorchScript).
Those are loaded only from a path the user typed, and each such file is named once per run in a
one-line warning on stderr (the bundled files, shipped with the code, are trusted silently).

Never executes code: reference statistics (.npz, read with allow_pickle=False; the detector they
record is an identity to check, never a file to open), sample and feature .npz files, dataset zips
and their dataset.json (size-capped), CIFAR-10 tarballs (restricted unpickler), our own training
states (torch.load(weights_only=True) with the RNG-state types allowed), TorchScript archives, and
torch state dicts (weights_only=True).
"""

import json
import os
import pickle
import sys

import numpy as np
import torch

import dnnlib
from training import bundled

#----------------------------------------------------------------------------
# The warning for files whose loading runs code.

_warned = set()

def is_bundled_file(path_or_url):
    if dnnlib.util.is_url(path_or_url):
        return False
    path = os.path.realpath(path_or_url)
    return os.path.dirname(path) == os.path.realpath(bundled.FOLDER)

def warn_code_executes(path_or_url, what='file'):
    """One line on stderr, once per file and process (rank 0 only), unless the file is bundled."""
    if is_bundled_file(path_or_url) or path_or_url in _warned:
        return
    _warned.add(path_or_url)
    if int(os.environ.get('RANK', '0')) == 0:
        print(f'Warning: loading {what} {path_or_url} runs the Python code it contains (pickle format); load only files you trust',
            file=sys.stderr, flush=True)

#----------------------------------------------------------------------------
# Pickles that may hold data only (CIFAR-10's python batches).

DATA_PICKLE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('_codecs', 'encode'), # How Python 2 pickles of numpy arrays carry their bytes under encoding='latin1'.
}

class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, tuples, bytes, str and numbers; refuses every other global."""
    def find_class(self, module, name):
        if (module, name) in DATA_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing to load {module}.{name}: only numpy arrays, lists, dicts, bytes, str and numbers are allowed')

def load_data_pickle(f, encoding='ASCII'):
    return DataOnlyUnpickler(f, encoding=encoding).load()

#----------------------------------------------------------------------------
# JSON read from archives and folders.

MAX_JSON_BYTES = 256 << 20 # dataset.json of ImageNet's 1.28M labels is about 50 MB.

def load_json_capped(f, where, max_bytes=MAX_JSON_BYTES):
    """json.load of a binary or text file object that refuses files over `max_bytes`."""
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f'{where} is larger than {max_bytes / (1 << 20):g} MB; refusing to read it as JSON')
    return json.loads(data)

class TooLarge(Exception):
    """A file over its size cap; the message is one line."""

#----------------------------------------------------------------------------
# Training states: ours load without running code.

def _training_state_safe_globals():
    # np.random.get_state() is ('MT19937', uint32 array, int, int, float); arrays and their dtypes
    # are what weights_only=True does not know by default.
    names = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType, np.dtypes.Int64DType]
    reconstruct = getattr(getattr(np, '_core', np.core), 'multiarray')._reconstruct
    scalar = getattr(getattr(np, '_core', np.core), 'multiarray').scalar
    return names + [reconstruct, scalar]

def _pickled_strings(path):
    """The string constants of a torch.save zip's pickle, read without unpickling anything."""
    import pickletools
    import zipfile
    with zipfile.ZipFile(path) as z:
        names = [name for name in z.namelist() if name.endswith('/data.pkl') or name == 'data.pkl']
        if not names:
            raise ValueError('no data.pkl inside')
        data = z.read(names[0])
    return {arg for _op, arg, _pos in pickletools.genops(data) if isinstance(arg, str)}

def load_training_state(path, state_format):
    """A training state written by this codebase, loaded with weights_only=True and the numpy RNG
    types allowed; only NVIDIA EDM's states (which pickle whole networks) take the unsafe
    torch.load, after the warning. A file that claims our format but holds anything else is refused.

    Raises ValueError with a one-line reason for files that cannot be used.
    """
    try:
        ours = state_format in _pickled_strings(path)
    except Exception as e: # Not a zip, truncated, damaged pickle stream.
        raise ValueError(f'{path} is not a readable training state (torch.save file): {type(e).__name__}: {first_line(e)}') from e
    if ours:
        try:
            with torch.serialization.safe_globals(_training_state_safe_globals()):
                state = torch.load(path, map_location=torch.device('cpu'), weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f'{path} claims to be a training state of this codebase but holds other objects; refusing to load it') from e
        except Exception as e:
            raise ValueError(f'{path} is not a readable training state ({type(e).__name__}: {first_line(e)})') from e
        if not isinstance(state, dict) or state.get('format') != state_format:
            raise ValueError(f'{path} is not a training state of this codebase (no "format" entry)')
        return state
    warn_code_executes(path, 'NVIDIA-format training state')
    try:
        return torch.load(path, map_location=torch.device('cpu'), weights_only=False)
    except Exception as e:
        raise ValueError(f'{path} is not a readable training state ({type(e).__name__}: {first_line(e)})') from e

def first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__

#----------------------------------------------------------------------------

"""Checks of command-line input that every CLI shares, each answering bad input in one line.

Each check raises click.ClickException (printed by click as one "Error: ..." line, exit status 1)
before any work starts, so that a wrong path or number never costs a sampling run, leaves no
partial file, and never ends in a traceback.
"""

import math
import os
import re
import zipfile

import click
import numpy as np
import torch

#----------------------------------------------------------------------------
# Output locations.

def _first_existing_ancestor(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path

def output_folder(path, option='--outdir'):
    """A folder that exists and is writable, or can be created; returns it unchanged."""
    if path is None or str(path).strip() == '':
        raise click.ClickException(f'{option} is empty; give the folder to write to')
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise click.ClickException(f'{option}={path} is a file, not a folder')
    ancestor = _first_existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise click.ClickException(f'{option}={path} cannot be created: {ancestor} is a file, not a folder')
    if not os.access(ancestor, os.W_OK | os.X_OK):
        what = 'is not writable' if ancestor == os.path.abspath(path) else f'cannot be created: {ancestor} is not writable'
        raise click.ClickException(f'{option}={path} {what}')
    return path

def output_file(path, option='--dest'):
    """A file path whose folder exists and is writable, or can be created; returns it unchanged."""
    if path is None or str(path).strip() == '':
        raise click.ClickException(f'{option} is empty; give the file to write')
    path = str(path)
    if os.path.isdir(path) or path.endswith(('/', os.sep)):
        raise click.ClickException(f'{option}={path} is a folder; give a file name')
    ancestor = _first_existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(ancestor):
        raise click.ClickException(f'{option}={path} cannot be created: {ancestor} is a file, not a folder')
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise click.ClickException(f'{option}={path} cannot be created: {ancestor} is not writable')
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise click.ClickException(f'{option}={path} exists and is not writable')
    return path

#----------------------------------------------------------------------------
# Numbers.

def finite(value, option):
    """A float that is neither NaN nor infinite (None passes: the option was not given)."""
    if value is not None and not math.isfinite(value):
        raise click.ClickException(f'{option}={value} is not a finite number')
    return value

def ordered(low, high, low_option, high_option):
    if low is not None and high is not None and low > high:
        raise click.ClickException(f'{low_option}={low:g} is above {high_option}={high:g}')

def unique_seeds(seeds, option='--seeds'):
    """The seeds without repeats, in their order; says so on stderr when some were dropped."""
    unique = list(dict.fromkeys(seeds))
    if len(unique) != len(seeds):
        click.echo(f'Warning: {option} lists {len(seeds) - len(unique)} seed(s) more than once; each is generated once', err=True)
    return unique

def parse_int_list(s):
    """A click type: '1,2,2' or '1-3' -> a list of integers (train.py's --cres)."""
    if isinstance(s, list):
        return s
    try:
        values = []
        for part in s.split(','):
            m = re.fullmatch(r'(\d+)-(\d+)', part)
            values.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
        return values
    except ValueError:
        raise click.BadParameter(f'"{s}" is not a list of integers like 1,2,2')

def seed_list_size(spec):
    """How many seeds '1,2,5-10' stands for, counted without expanding the ranges."""
    count = 0
    for part in str(spec).split(','):
        low, _, high = part.strip().partition('-')
        if low.isdigit() and high.isdigit():
            count += max(int(high) - int(low) + 1, 0)
        else:
            count += 1
    return count

#----------------------------------------------------------------------------
# Machines.

def device_available(device):
    """'cuda' without a GPU is refused in one line; None and 'cpu' pass."""
    if device is not None and str(device).startswith('cuda') and not torch.cuda.is_available():
        raise click.ClickException(f'--device={device}, but no CUDA GPU is available here; use --device=cpu')
    return device

def available_memory_bytes(device=None):
    if device is not None and torch.device(device).type == 'cuda' and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return None

def memory_fits(num_bytes, what, hint='', device=None):
    """Refuse work whose estimated memory exceeds what the machine has free, with the estimate."""
    available = available_memory_bytes(device)
    if available is not None and num_bytes > available:
        raise click.ClickException(f'{what} needs about {num_bytes / (1 << 30):.1f} GiB, but {available / (1 << 30):.1f} GiB '
            f'{"of GPU memory " if device is not None and torch.device(device).type == "cuda" else ""}is free{"; " + hint if hint else ""}')

#----------------------------------------------------------------------------
# Input files: what kind a file is, from its first bytes.

def file_kind(path):
    """'missing', 'folder', 'empty file', 'npz file', 'TorchScript archive', 'torch.save file',
    'zip file', 'npy array', 'pickle', 'gzip file', 'PNG image', 'JSON/text file' or 'file of unknown kind'."""
    if not os.path.exists(path):
        return 'missing'
    if os.path.isdir(path):
        return 'folder'
    with open(path, 'rb') as f:
        head = f.read(8)
    if not head:
        return 'empty file'
    if head[:4] == b'PK\x03\x04':
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return 'damaged zip file'
        if names and all(name.endswith('.npy') for name in names):
            return 'npz file'
        if any(name.endswith('/constants.pkl') or name == 'constants.pkl' for name in names):
            return 'TorchScript archive'
        if any(name.endswith('/data.pkl') or name == 'data.pkl' for name in names):
            return 'torch.save file'
        return 'zip file'
    if head[:6] == b'\x93NUMPY':
        return 'npy array'
    if head[:1] == b'\x80':
        return 'pickle'
    if head[:2] == b'\x1f\x8b':
        return 'gzip file'
    if head[:8] == b'\x89PNG\r\n\x1a\n':
        return 'PNG image'
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return 'JSON/text file'
    return 'file of unknown kind'

def expect_kind(path, option, expected):
    """Refuse a local file whose kind is not in `expected` (URLs pass: they are checked on download)."""
    if path is None or '://' in str(path):
        return path
    kind = file_kind(path)
    # Missing files, text and unknown bytes: the loader says what is wrong with them, in its words.
    if kind not in expected and kind not in ('missing', 'JSON/text file', 'file of unknown kind'):
        raise click.ClickException(f'{option}={path} is {with_article(kind)}, expected {with_article(" or ".join(expected))}')
    return path

def with_article(noun):
    return ('an ' if noun[0].lower() in 'aeiou' or noun.startswith(('npz', 'npy')) else 'a ') + noun # "an npz", said en-pee-zed.

NETWORK_KINDS = ('pickle', 'torch.save file') # EDM's network pickles; weights-only network files (training/checkpoint.py).
STATE_DICT_KINDS = ('torch.save file', 'pickle') # torch.save of older versions is a plain pickle.
TORCH_MODULE_KINDS = ('TorchScript archive', 'pickle')

def readable_npz(path, option, required_keys=()):
    """A local .npz file that opens and holds `required_keys`; its arrays are not loaded here."""
    if path is None or '://' in str(path):
        return path
    if not os.path.exists(path):
        return path # The loader's "not found" message names what the file was for.
    if not os.path.isfile(path):
        raise click.ClickException(f'{option}={path} is a folder, expected an .npz file')
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise click.ClickException(f'{option}={path} is a single .npy array, not an .npz file')
        with npz:
            keys = list(npz.keys())
            if not all(key in keys for key in required_keys):
                names = ' and '.join(f'"{key}"' for key in required_keys)
                raise click.ClickException(f'{option}={path} has no {names} array{"s" if len(required_keys) > 1 else ""} '
                    f'(it has: {", ".join(keys) or "nothing"})')
            for key in required_keys:
                npz[key] # Reads the member fully: a truncated file fails here rather than mid-run.
    except click.ClickException:
        raise
    except Exception as e: # np.load's many ways to say "not an npz" (BadZipFile, ValueError, EOFError, OSError).
        reason = str(e).strip().splitlines()[0] if str(e).strip() else 'truncated?'
        raise click.ClickException(f'Cannot read {option}={path} as an .npz file ({type(e).__name__}: {reason})')
    return path

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------

class NumberList(click.ParamType):
    """A click type for comma-separated numbers: each converted by `kind`, all accepted by `valid`.

    `noun` names what a number is in the message for a value that does not convert ("integers"),
    `requirement` what a valid list holds ("at least one positive integer").
    """
    name = 'list'

    def __init__(self, kind, valid, noun, requirement):
        self.kind, self.valid, self.noun, self.requirement = kind, valid, noun, requirement

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            values = [self.kind(v) for v in str(value).split(',') if v.strip()]
        except ValueError:
            self.fail(f'"{value}" is not a comma-separated list of {self.noun}', param, ctx)
        if not values or not all(self.valid(v) for v in values):
            self.fail(f'"{value}": give {self.requirement}', param, ctx)
        return values

"""What a run was: the settings record every CLI writes beside its outputs.

A record is a small JSON file holding the settings actually used (presets expanded, defaults
filled in), each input file with its sha256, and the code version (the git commit when the code
is a git checkout), so that a folder of results can be traced back and reproduced. train.py's
training_options.json is the same idea for training runs.

generate.py writes `<outdir>-settings.json` beside its image folder, which must hold the images and
nothing else; the other CLIs write `settings.json` inside their --outdir.
"""

import datetime
import hashlib
import json
import os
import subprocess
import sys

import dnnlib

#----------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_FOLDERS = ('training', 'torch_utils', 'dnnlib', 'tests', 'bundled')

def check_outdir(outdir, flag='--outdir'):
    """ValueError when `outdir` lies inside one of this codebase's package folders."""
    target = os.path.realpath(outdir)
    for folder in PACKAGE_FOLDERS:
        package = os.path.realpath(os.path.join(REPO_ROOT, folder))
        if target == package or target.startswith(package + os.sep):
            raise ValueError(f'{flag}={outdir} is inside the package folder {folder}/; write runs elsewhere, e.g. {flag}=out')

def beside(outdir, suffix):
    """`<outdir><suffix>` next to the folder, e.g. out -> out-settings.json."""
    return os.path.normpath(outdir) + suffix

#----------------------------------------------------------------------------

def code_version():
    """The git commit of this checkout (with '-dirty' for uncommitted changes), or None without git."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ('-dirty' if status.returncode == 0 and status.stdout.strip() else '')
    except (OSError, subprocess.SubprocessError):
        return None

def sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()

def recorded_path(path):
    """`path` as a record should hold it: relative to this checkout for its own files (the bundled
    defaults), so that records committed from one checkout do not name another's folders; as given otherwise."""
    path = str(path)
    if '://' in path:
        return path
    absolute = os.path.realpath(path)
    root = os.path.realpath(REPO_ROOT)
    return os.path.relpath(absolute, root) if absolute.startswith(root + os.sep) else path

def file_record(path):
    """{path, sha256} of an input; sha256 is None for a URL or a folder (a folder's files are not hashed)."""
    if path is None:
        return None
    return dict(path=recorded_path(path), sha256=(sha256(path) if os.path.isfile(path) else None))

#----------------------------------------------------------------------------

def write_settings(path, settings):
    """Write `settings` (JSON-serializable) with the code version and command line, atomically."""
    record = dict(settings, code_version=code_version(), command=sys.argv,
        written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with dnnlib.util.atomic_write(path, mode='w') as f:
        json.dump(record, f, indent=2, default=str)
    return record

def read_settings(path):
    """The record at `path`; ValueError naming the file when it is not a JSON object."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f'{path} cannot be read as JSON ({e.__class__.__name__}: {e})') from None
    if not isinstance(record, dict):
        raise ValueError(f'{path} does not hold a settings record')
    return record

#----------------------------------------------------------------------------

"""Attribute dictionaries, object lookup by dotted name, logging to file, and URL opening with an
on-disk cache that works offline when the file is already there or given as a local path."""

import contextlib
import errno
import glob
import hashlib
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse

#----------------------------------------------------------------------------
# Dictionary whose keys are also attributes. Pickles from NVIDIA EDM store
# `dataset_kwargs` as `dnnlib.util.EasyDict`, so the name and module are fixed.

class EasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

#----------------------------------------------------------------------------
# Copy of everything printed to stdout/stderr into a log file (train.py's log.txt).

class Logger:
    """From construction until close(), sys.stdout and sys.stderr both write to the original
    stdout and, when `file_name` is given, to that file too."""

    def __init__(self, file_name=None, file_mode='a', should_flush=True):
        self.file = open(file_name, file_mode, encoding='utf-8') if file_name is not None else None
        self.should_flush = should_flush # Flush after every write, so that a crash loses nothing.
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def _targets(self):
        return [self.stdout] if self.file is None else [self.file, self.stdout]

    def write(self, text):
        text = text.decode() if isinstance(text, bytes) else text
        if text:
            for target in self._targets():
                target.write(text)
            if self.should_flush:
                self.flush()

    def flush(self):
        for target in self._targets():
            target.flush()

    def isatty(self):
        return False

    def close(self):
        """Flush, hand sys.stdout / sys.stderr back where they are still this logger (another
        logger may have been stacked on top), close the file."""
        self.flush()
        for stream_name, original in [('stdout', self.stdout), ('stderr', self.stderr)]:
            if getattr(sys, stream_name) is self:
                setattr(sys, stream_name, original)
        if self.file is not None:
            self.file.close()
            self.file = None

#----------------------------------------------------------------------------

def format_time(seconds):
    """'42s', '3m 07s', '2h 03m 07s' or '1d 02h 03m': the largest units, to the nearest second."""
    total = int(round(seconds))
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if total < 60:
        return f'{total}s'
    if hours == 0 and days == 0:
        return f'{minutes}m {secs:02d}s'
    if days == 0:
        return f'{hours}h {minutes:02d}m {secs:02d}s'
    return f'{days}d {hours:02d}h {minutes:02d}m'

#----------------------------------------------------------------------------
# Cache folder. The layout `{cache}/downloads/{md5(url)}_{name}` is the one
# NVIDIA's dnnlib uses, so files it already downloaded are found here too.

_cache_dir = None

def set_cache_dir(path):
    global _cache_dir
    _cache_dir = path

def make_cache_dir_path(*paths):
    """A path in the cache folder: set_cache_dir()'s, else $DNNLIB_CACHE_DIR, else .cache/dnnlib in
    the home folder ($HOME, or %USERPROFILE% on Windows) or, without one, in the temporary folder."""
    if _cache_dir is not None:
        root = _cache_dir
    elif 'DNNLIB_CACHE_DIR' in os.environ:
        root = os.environ['DNNLIB_CACHE_DIR']
    else:
        home = os.environ.get('HOME', os.environ.get('USERPROFILE'))
        root = os.path.join(tempfile.gettempdir() if home is None else home, '.cache', 'dnnlib')
    return os.path.join(root, *paths)

#----------------------------------------------------------------------------
# Objects by dotted name, e.g. 'training.networks.EDMPrecond'.

def get_obj_by_name(name):
    parts = name.split('.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue # This prefix is not a module; try a shorter one.
            raise # The module exists but one of its own imports is missing.
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    return importlib.import_module(name)

def call_func_by_name(*args, func_name=None, **kwargs):
    assert func_name is not None
    return get_obj_by_name(func_name)(*args, **kwargs)

def construct_class_by_name(*args, class_name=None, **kwargs):
    return call_func_by_name(*args, func_name=class_name, **kwargs)

#----------------------------------------------------------------------------
# URL handling.

class DownloadError(OSError):
    """A remote file could not be fetched; the message says how to supply it locally."""

def is_url(obj, allow_file_urls=False):
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    parsed = urllib.parse.urlparse(obj)
    return parsed.scheme in ('http', 'https') and bool(parsed.netloc)

def url_cache_file_pattern(url, cache_dir=None):
    cache_dir = cache_dir if cache_dir is not None else make_cache_dir_path('downloads')
    return os.path.join(cache_dir, hashlib.md5(url.encode('utf-8')).hexdigest() + '_*')

def open_url(url, cache_dir=None, num_attempts=3, verbose=True, return_filename=False, cache=True, timeout=60):
    """Open a local path, a file:// URL or an http(s) URL as a binary file object.

    Remote files are kept in `cache_dir` (default: `make_cache_dir_path('downloads')`) and served
    from there on later calls, so a machine without internet access can use a file that was
    downloaded once, or copied there by hand under the name the error message gives.
    """
    assert num_attempts >= 1
    assert not (return_filename and not cache)

    # Local files.
    if not re.match('^[a-z]+://', url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'No such file: {url}')
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        filename = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        if re.match(r'^/[a-zA-Z]:', filename): # file:///c:/x on Windows.
            filename = filename[1:]
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'No such file: {filename} (from {url})')
        return filename if return_filename else open(filename, 'rb')
    if not is_url(url):
        raise ValueError(f'Not a local path or an http(s)/file URL: {url}')

    # Cached copy.
    cache_dir = cache_dir if cache_dir is not None else make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        cache_files = sorted(glob.glob(os.path.join(cache_dir, url_md5 + '_*')))
        if len(cache_files) >= 1:
            return cache_files[0] if return_filename else open(cache_files[0], 'rb')

    # Download.
    import requests # Imported here: only remote URLs need it.
    url_name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    data = None
    last_error = None
    if verbose:
        print(f'Downloading {url} ...', end='', flush=True)
    with requests.Session() as session:
        for attempt in range(num_attempts):
            try:
                with session.get(url, timeout=timeout) as res:
                    res.raise_for_status()
                    if len(res.content) == 0:
                        raise IOError('no data received')
                    match = re.search(r'filename="([^"]*)"', res.headers.get('Content-Disposition', ''))
                    url_name = match[1] if match else url_name
                    data = res.content
                break
            except KeyboardInterrupt:
                raise
            except Exception as e: # Any network failure: retry, then report below.
                last_error = e
                if attempt + 1 < num_attempts:
                    time.sleep(min(2 ** attempt, 10))
    if data is None:
        if verbose:
            print(' failed')
        safe_name = re.sub(r'[^0-9a-zA-Z-._]', '_', url_name)[:128]
        raise DownloadError(f'Could not download {url} ({type(last_error).__name__}: {last_error}). '
            f'Without internet access, pass the file as a local path instead of the URL, '
            f'or copy it into the cache folder {cache_dir} as {url_md5}_{safe_name}')
    if verbose:
        print(' done')

    # Save to cache atomically, so a crash never leaves a truncated file that later runs trust.
    if cache:
        safe_name = re.sub(r'[^0-9a-zA-Z-._]', '_', url_name)[:128]
        cache_file = os.path.join(cache_dir, url_md5 + '_' + safe_name)
        with atomic_write(cache_file, fsync=True) as f:
            f.write(data)
        if return_filename:
            return cache_file
    return io.BytesIO(data)

#----------------------------------------------------------------------------
# Atomic file writes: a crash or Ctrl-C leaves either the previous file or the
# complete new one, never a truncated PNG, pickle or npz that later runs trust.

def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

@contextlib.contextmanager
def atomic_write(path, mode='wb', fsync=False):
    """Context manager yielding a file object whose contents replace `path` on success.

    The rename alone protects against a crashed or killed process; fsync=True also flushes the
    data to disk first, which guards against power loss but is slow for thousands of small files.
    """
    assert mode in ('wb', 'w')
    folder = os.path.dirname(os.path.abspath(path))
    created = folder # The top-most folder this write creates, removed again if the write fails.
    while not os.path.exists(os.path.dirname(created)) and os.path.dirname(created) != created:
        created = os.path.dirname(created)
    created = None if os.path.exists(folder) else created
    os.makedirs(folder, exist_ok=True)
    prefix = '.' + os.path.basename(path) + '.'
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix='.tmp')
    try:
        os.chmod(tmp, 0o666 & ~current_umask()) # mkstemp makes the file private; give it the usual permissions.
        with os.fdopen(fd, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if created is not None:
            remove_empty_folders(folder, created)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            import click # A full disk is the user's to fix: one line, as every CLI reports bad input.
            raise click.ClickException(f'No space left on the device to write {path}; the partial file was removed') from e
        raise

def remove_empty_folders(folder, top):
    """Remove `folder` and its parents up to and including `top`, as long as they are empty."""
    while True:
        try:
            os.rmdir(folder)
        except OSError:
            return
        if folder == top:
            return
        folder = os.path.dirname(folder)

_STARTED = time.time()
_swept_folders = set()
_TEMPORARY_NAME = re.compile(r'^\..+\.[A-Za-z0-9_]{8}\.tmp$') # What atomic_write's mkstemp names look like.

def remove_stale_temporaries(folder):
    """Once per folder and process: remove the hidden temporaries that killed writes left there.

    Only files last written before this process started count as stale, so that the temporaries of
    other ranks writing into the same folder right now are left alone."""
    if folder in _swept_folders:
        return
    _swept_folders.add(folder)
    try:
        entries = [entry for entry in os.scandir(folder) if _TEMPORARY_NAME.match(entry.name)]
    except OSError:
        return
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime < _STARTED - 5:
                if entry.is_dir(follow_symlinks=False): # dataset_tool.py builds a folder --dest as a hidden temporary folder.
                    shutil.rmtree(entry.path)
                else:
                    os.remove(entry.path)
        except OSError:
            pass

#----------------------------------------------------------------------------

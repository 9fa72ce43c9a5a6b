"""Sets of images to evaluate: an image folder or zip, or `.npz` sample files.

Folders and zips are read with training.dataset.ImageFolderDataset (subfolders included, so the
output of `generate.py --subdirs` works as is). Sample files are `.npz` archives with a `samples`
array of uint8 NHWC images, as the discriminator-guidance code writes them (`samples_*.npz`), or,
failing that, an `arr_0` array, as guided-diffusion's samplers and the ADM evaluator's reference
batches hold them (`np.savez(path, images[, labels])`); a single file or a folder of them may be given. Either way the result is a training.dataset.Dataset,
so `max_size` / `random_seed` pick the same kind of seeded subset.
"""

import os
import zipfile

import numpy as np

from training import dataset

#----------------------------------------------------------------------------

SAMPLES_KEY = 'samples'
ARRAY_KEYS = {SAMPLES_KEY: 'label', 'arr_0': 'arr_1'} # Images key -> labels key, in order of preference.

def read_npz_header(path):
    """(key, shape, dtype) of the images array in an .npz file, read from the header only (no decompression of the data)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name[:-len('.npy')] for name in archive.namelist() if name.endswith('.npy')]
            key = next((key for key in ARRAY_KEYS if key in names), None)
            if key is None:
                raise dataset.DatasetError(f'{path} has no "samples" or "arr_0" array (it has: {", ".join(names) or "nothing"}); '
                    f'sample files must hold uint8 NHWC images under "samples"')
            with archive.open(key + '.npy') as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
                else: # No public header reader for newer versions: read the array itself.
                    with np.load(path) as npz:
                        array = npz[key]
                    shape, dtype = array.shape, array.dtype
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise dataset.DatasetError(f'Cannot read {path} as an .npz file ({e})') from e
    return key, tuple(shape), np.dtype(dtype)

class NpzSampleDataset(dataset.Dataset):
    """Images from the `samples` (or `arr_0`) arrays of one or more .npz files, in file order (files sorted by name)."""
    def __init__(self,
        path,                   # An .npz file, or a folder whose .npz files (searched recursively) are all read.
        name        = None,     # Dataset name; None = file or folder name without extension.
        max_size    = None,     # Use a random subset of this many images; None = all.
        random_seed = 0,        # Seed that picks the max_size subset.
        **kwargs,               # use_labels, xflip, cache: as for training.dataset.Dataset (labels: the `label` arrays).
    ):
        self._path = str(path)
        if os.path.isdir(self._path):
            self._files = sorted(os.path.join(root, fname) for root, _dirs, files in os.walk(self._path)
                for fname in files if fname.lower().endswith('.npz'))
        elif os.path.isfile(self._path):
            self._files = [self._path]
        else:
            raise dataset.DatasetError(f'Sample file not found: {self._path}')
        if len(self._files) == 0:
            raise dataset.DatasetError(f'No .npz files found in {self._path}')

        counts = []
        self._keys = []
        image_shape = None
        for fname in self._files:
            key, shape, dtype = read_npz_header(fname)
            self._keys.append(key)
            if len(shape) != 4 or dtype != np.uint8 or shape[3] not in (1, 3):
                raise dataset.DatasetError(f'"{key}" in {fname} is {dtype} of shape {list(shape)}; '
                    f'expected uint8 images of shape [N, H, W, C] with C = 1 or 3')
            if image_shape is None:
                image_shape = shape[1:]
            if shape[1:] != image_shape:
                raise dataset.DatasetError(f'{fname} holds {shape[2]}x{shape[1]}x{shape[3]} images, but {self._files[0]} '
                    f'holds {image_shape[1]}x{image_shape[0]}x{image_shape[2]}; all images must have the same size')
            counts.append(shape[0])
        self._offsets = np.cumsum([0] + counts)
        self._loaded = (None, None) # (file index, samples array): one file at a time per process.

        h, w, c = image_shape
        if h != w:
            raise dataset.DatasetError(f'Images must be square, but {self._files[0]} holds {w}x{h} images')
        if name is None:
            name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        super().__init__(name=name, raw_shape=[int(self._offsets[-1]), c, h, w], max_size=max_size, random_seed=random_seed, **kwargs)

    @property
    def files(self):
        return list(self._files)

    def __getstate__(self): # DataLoader workers re-read the files they need.
        return dict(self.__dict__, _loaded=(None, None))

    def _load_raw_image(self, raw_idx):
        file_idx = int(np.searchsorted(self._offsets, raw_idx, side='right')) - 1
        if self._loaded[0] != file_idx:
            with np.load(self._files[file_idx]) as npz:
                self._loaded = (file_idx, npz[self._keys[file_idx]])
        return self._loaded[1][raw_idx - self._offsets[file_idx]].transpose(2, 0, 1) # HWC => CHW

    def _load_raw_labels(self):
        # Class labels, where every file has them: `label` as generate.py --npz and the
        # discriminator-guidance code write it (one-hot [N, C]) or as class indices [N]; `arr_1`
        # next to `arr_0` as guided-diffusion writes them.
        labels = []
        for fname, key in zip(self._files, self._keys):
            with np.load(fname) as npz:
                if ARRAY_KEYS[key] not in npz.files:
                    return None
                labels.append(np.asarray(npz[ARRAY_KEYS[key]]))
        labels = np.concatenate(labels)
        if labels.ndim == 1:
            return labels.astype(np.int64)
        return labels.reshape(len(labels), -1).astype(np.float32)

#----------------------------------------------------------------------------

def _find_files(folder):
    """(any image files?, any .npz files?) below folder."""
    has_images = has_npz = False
    for _root, _dirs, files in os.walk(folder):
        has_images = has_images or any(dataset.is_image_file(fname) for fname in files)
        has_npz = has_npz or any(fname.lower().endswith('.npz') for fname in files)
    return has_images, has_npz

def open_images(path, max_size=None, random_seed=0, **kwargs):
    """The images at `path` (folder, zip, .npz file, folder of .npz files) as a training.dataset.Dataset.

    Raises training.dataset.DatasetError with a one-line message for anything unusable.
    """
    path = str(path)
    if os.path.isfile(path) and path.lower().endswith('.npz'):
        return NpzSampleDataset(path, max_size=max_size, random_seed=random_seed, **kwargs)
    if os.path.isdir(path):
        has_images, has_npz = _find_files(path)
        if has_images and has_npz:
            raise dataset.DatasetError(f'{path} holds both image files and .npz sample files; put them into separate folders')
        if has_npz:
            return NpzSampleDataset(path, max_size=max_size, random_seed=random_seed, **kwargs)
    return dataset.ImageFolderDataset(path, max_size=max_size, random_seed=random_seed, **kwargs)

#----------------------------------------------------------------------------

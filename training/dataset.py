"""Image datasets as dataset_tool.py writes them: a folder or zip of images plus `dataset.json`.

`ImageFolderDataset` takes the constructor arguments of NVIDIA EDM's class of the same name,
because EDM snapshots store `dataset_kwargs` with `class_name='training.dataset.ImageFolderDataset'`
and train.py / fid.py rebuild the dataset from them. For the same arguments it yields the same
images, labels and `max_size` subset in the same order.
"""

import os
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib
from training import safety

#----------------------------------------------------------------------------

class DatasetError(Exception):
    """Data that cannot be used; the message is one line meant for the user as is."""

#----------------------------------------------------------------------------
# Which files are images, and how they become arrays.

def is_image_file(name):
    """True for file names with an extension registered with Pillow: the set EDM indexes, so that
    raw indices (and with them max_size subsets) agree with EDM's for the same folder."""
    return os.path.splitext(name)[1].lower() in PIL.Image.registered_extensions()

def _is_opaque(alpha):
    return alpha.getextrema()[0] == 255

def image_to_array(image, name):
    """A PIL image as an HWC uint8 array with 1 (grayscale) or 3 (RGB) channels.

    Grayscale and RGB are taken as stored (EXIF orientation is ignored, as EDM does). Lossless
    conversions happen silently: bilevel -> grayscale; palette, CMYK and YCbCr -> RGB; an alpha
    channel that is fully opaque is dropped. Real transparency is an error: there is no right
    background to flatten it onto, so the user has to choose one. So are 16-bit and float images.
    NVIDIA EDM passes all of these through np.array() unchanged, which turns palette images
    into their palette indices and RGBA into 4-channel data.
    """
    mode = image.mode
    if mode == 'P':
        image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
    elif mode == '1':
        image = image.convert('L')
    elif mode in ('CMYK', 'YCbCr'):
        image = image.convert('RGB')
    elif mode in ('PA', 'La', 'RGBa'):
        image = image.convert('RGBA' if mode != 'La' else 'LA')
    if image.mode in ('LA', 'RGBA'):
        if not _is_opaque(image.getchannel('A')):
            raise DatasetError(f'{name} has transparent pixels (mode {mode}); flatten it onto a background and save it as RGB')
        image = image.convert(image.mode[:-1])
    if image.mode not in ('L', 'RGB'):
        raise DatasetError(f'{name} has unsupported image mode {mode}; convert it to 8-bit RGB or grayscale')
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, np.newaxis] if array.ndim == 2 else array

def read_image(f, name):
    """Decode one image file (a binary file object) into an HWC uint8 array; DatasetError names `name`."""
    try:
        with PIL.Image.open(f) as image:
            image.load()
            return image_to_array(image, name)
    except DatasetError:
        raise
    except Exception as e: # Decoders of damaged files fail in many ways; all of them mean "unreadable".
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f'Cannot read image {name}: {reason}') from e

#----------------------------------------------------------------------------
# Labels from dataset.json: {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}.

def parse_labels(entries, image_names, where):
    """Labels of `image_names`, in their order: int64 [N] class indices or float32 [N, D] vectors.

    `entries` is the "labels" list of dataset.json. Integer-valued scalars are class indices (the
    network gets them one-hot); anything else must be a flat vector of the same length for every
    image. NVIDIA EDM truncates fractional scalars to integers; here they become 1-vectors.
    """
    if not isinstance(entries, list) or not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in entries):
        raise DatasetError(f'{where}: "labels" must be a list of [file name, label] pairs')
    by_name = {str(fname).replace('\\', '/'): label for fname, label in entries}
    missing = [fname for fname in image_names if fname.replace('\\', '/') not in by_name]
    if missing:
        raise DatasetError(f'{where} has no label for {missing[0]}' + (f' and {len(missing) - 1} other images' if len(missing) > 1 else ''))
    try:
        labels = np.array([by_name[fname.replace('\\', '/')] for fname in image_names])
    except ValueError:
        labels = np.array([], dtype=object)
    if labels.dtype.kind not in 'iuf' or labels.ndim not in (1, 2):
        raise DatasetError(f'{where}: every label must be a class index or a list of numbers of one fixed length')
    if labels.ndim == 1 and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        if labels.size and labels.min() < 0:
            raise DatasetError(f'{where}: class indices must not be negative (found {labels.min()})')
        return labels.astype(np.int64)
    return labels.reshape(len(image_names), -1).astype(np.float32)

#----------------------------------------------------------------------------
# Indexing, subsets, x-flips, labels and caching, independent of where the images come from.

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                   # Name of the dataset, e.g. for run folder names.
        raw_shape,              # Shape of all images together: [N, C, H, W].
        max_size    = None,     # Use a random subset of this many images; None = all. Applied before xflip.
        use_labels  = False,    # Return class labels? False = labels of dimension zero.
        xflip       = False,    # Append a mirrored copy of every image (doubles the length). Applied after max_size.
        random_seed = 0,        # Seed that picks the max_size subset.
        cache       = False,    # Keep decoded images in memory (per process, i.e. per DataLoader worker)?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict() # {raw_idx: CHW uint8 array}

        # Labels are read now rather than on first use, so that a missing dataset.json is reported
        # before training starts instead of inside a DataLoader worker.
        self._raw_labels = self._load_raw_labels() if use_labels else None
        if use_labels and self._raw_labels is None:
            raise DatasetError(f'Dataset {name} has no labels (no "labels" list in dataset.json), but labels were asked for; '
                'train unconditionally or recreate the dataset with labels')
        if self._raw_labels is None:
            self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
        assert self._raw_labels.shape[0] == self._raw_shape[0]
        if self._raw_labels.dtype == np.int64:
            self._label_shape = [int(self._raw_labels.max()) + 1]
        else:
            self._label_shape = list(self._raw_labels.shape[1:])

        # The subset is EDM's: shuffle all indices with the seed, keep the first max_size, sort.
        kept = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and kept.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(kept)
            kept = np.sort(kept[:max_size])
        # With xflip, the kept images appear twice: as they are, then mirrored.
        copies = 2 if xflip else 1
        self._raw_idx = np.tile(kept, copies)
        self._xflip = np.repeat(np.arange(copies, dtype=np.uint8), kept.size)

    def _load_raw_image(self, raw_idx): # CHW uint8 array; overridden by subclasses.
        raise NotImplementedError

    def _load_raw_labels(self): # int64 [N] or float32 [N, D], or None without labels; overridden by subclasses.
        raise NotImplementedError

    def close(self):
        pass

    def __del__(self):
        try:
            self.close()
        except Exception: # Interpreter shutdown may have torn down what close() needs.
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        """float32 label of item `idx`: one-hot for class indices, the stored vector otherwise."""
        label = self._raw_labels[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self._label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    def get_details(self, idx):
        return dnnlib.EasyDict(
            raw_idx     = int(self._raw_idx[idx]),
            xflip       = bool(self._xflip[idx]),
            raw_label   = self._raw_labels[self._raw_idx[idx]].copy(),
        )

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self): # [C, H, W]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        assert self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    # Labels: int64 class indices are handed out as one-hot vectors of max + 1 classes, float labels as
    # stored; a dataset without labels has label_shape [0], so label_dim 0 means unconditional.
    label_shape = property(lambda self: list(self._label_shape))
    has_labels = property(lambda self: any(self._label_shape))
    has_onehot_labels = property(lambda self: self._raw_labels.dtype == np.int64)

    @property
    def label_dim(self):
        (dim,) = self._label_shape # Networks take label vectors; a [N, A, B] label array has no label_dim.
        return dim

#----------------------------------------------------------------------------
# Images found recursively in a folder or zip, in sorted order of their relative paths.

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                   # Folder or zip holding the images, searched recursively.
        resolution  = None,     # Required width and height; None = whatever the images have.
        name        = None,     # Dataset name; None = file or folder name without extension.
        max_size    = None,     # Use a random subset of this many images; None = all. Applied before xflip.
        use_labels  = False,    # Return class labels from dataset.json? False = labels of dimension zero.
        xflip       = False,    # Append a mirrored copy of every image (doubles the length).
        random_seed = 0,        # Seed that picks the max_size subset.
        cache       = False,    # Keep decoded images in memory (per process, i.e. per DataLoader worker)?
        use_pyspng  = True,     # Accepted because EDM's dataset_kwargs may hold it; Pillow always decodes.
    ):
        del use_pyspng
        self._path = str(path)
        self._zipfile = None
        self._zipfile_pid = None
        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path)
                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif os.path.isfile(self._path):
            if os.path.splitext(self._path)[1].lower() != '.zip':
                raise DatasetError(f'Dataset {self._path} is neither a folder nor a .zip file')
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f'Dataset {self._path} is not a readable zip file ({e})') from e
        else:
            raise DatasetError(f'Dataset not found: {self._path}')

        self._image_fnames = sorted(fname for fname in self._all_fnames if is_image_file(fname))
        if len(self._image_fnames) == 0:
            raise DatasetError(f'No image files found in {self._path}')

        # The first image sets the shape; every later image is checked against it when it is read,
        # rather than here, which would mean opening every file of a million-image dataset up front.
        first = self._read_image(0)
        c, h, w = first.shape
        if h != w:
            raise DatasetError(f'Images must be square, but {self._image_fnames[0]} in {self._path} is {w}x{h}; '
                f'convert with dataset_tool.py --transform=center-crop --resolution=NxN')
        if resolution is not None and h != resolution:
            raise DatasetError(f'Images in {self._path} are {w}x{h}, but resolution {resolution} was asked for; '
                f'convert with dataset_tool.py --resolution={resolution}x{resolution}')
        if name is None:
            name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        super().__init__(name=name, raw_shape=[len(self._image_fnames), c, h, w], max_size=max_size,
            use_labels=use_labels, xflip=xflip, random_seed=random_seed, cache=cache)

    @property
    def path(self):
        return self._path

    @property
    def image_fnames(self):
        """Relative file names of all images (before max_size and xflip), in raw index order."""
        return list(self._image_fnames)

    def _get_zipfile(self):
        # One handle per process: a handle inherited through fork shares its file offset with the
        # parent's, so DataLoader workers reading through it would interleave their seeks.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        try:
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None
            self._zipfile_pid = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zipfile_pid=None)

    def _read_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        where = f'{fname} in {self._path}'
        try:
            f = self._open_file(fname)
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise DatasetError(f'Cannot read {where}: {e}') from e
        with f:
            return read_image(f, where).transpose(2, 0, 1) # HWC => CHW

    def _load_raw_image(self, raw_idx):
        image = self._read_image(raw_idx)
        if list(image.shape) != self.image_shape:
            c, h, w = image.shape
            raise DatasetError(f'{self._image_fnames[raw_idx]} in {self._path} is {w}x{h} with {c} channels, but the first image '
                f'is {self.image_shape[2]}x{self.image_shape[1]} with {self.image_shape[0]}; all images must have the same size')
        return image

    def _load_raw_labels(self):
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        where = f'{fname} in {self._path}'
        try:
            with self._open_file(fname) as f:
                meta = safety.load_json_capped(f, where)
        except safety.TooLarge as e:
            raise DatasetError(str(e)) from e
        except (OSError, ValueError) as e:
            raise DatasetError(f'Cannot read {where}: {e}') from e
        if not isinstance(meta, dict) or meta.get('labels') is None:
            return None
        return parse_labels(meta['labels'], self._image_fnames, where)

#----------------------------------------------------------------------------
# Reading a whole dataset in batches, split over ranks, e.g. to compute statistics of an image
# folder written by generate.py (subfolders included) or of a training zip.

def rank_batch_indices(num_images, batch_size, rank=0, world_size=1):
    """This rank's share of range(num_images) as int64 tensors of at most batch_size indices.

    The split is NVIDIA EDM fid.py's. Empty batches (only when there are fewer images than
    ranks) are left out, so ranks may differ in their number of batches.
    """
    if num_images == 0:
        return []
    num_batches = ((num_images - 1) // (batch_size * world_size) + 1) * world_size
    all_batches = torch.arange(num_images).tensor_split(num_batches)
    return [batch for batch in all_batches[rank::world_size] if len(batch) > 0]

def _worker_error_message(message):
    # DataLoader re-raises a worker's exception with the worker's traceback in its message; the
    # user needs the last line only, which is the original exception's.
    last = message.strip().splitlines()[-1]
    prefix = f'{DatasetError.__module__}.{DatasetError.__name__}: '
    return last[len(prefix):] if last.startswith(prefix) else last

def iterate_image_batches(dataset, batch_size, rank=0, world_size=1, num_workers=2, **dataset_kwargs):
    """Yield (images, labels) of this rank's share: uint8 [N, C, H, W] and float32 [N, label_dim] tensors.

    `dataset` is a Dataset or the path of a folder or zip, opened as
    ImageFolderDataset(path, **dataset_kwargs). Every image is in exactly one batch of one rank.
    """
    if not isinstance(dataset, Dataset):
        dataset = ImageFolderDataset(dataset, **dataset_kwargs)
    batches = rank_batch_indices(len(dataset), batch_size, rank, world_size)
    if len(batches) == 0:
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    iterator = iter(loader)
    try:
        yield from iterator
        return
    except DatasetError as e:
        message = _worker_error_message(str(e))
        # DataLoader's re-raised exception and its traceback form a cycle that holds the iterator:
        # left to the garbage collector, the workers' shutdown waits 5 s each. Broken here, the
        # workers stop as soon as the iterator is dropped.
        e.__traceback__ = None
    del iterator
    raise DatasetError(message)

#----------------------------------------------------------------------------

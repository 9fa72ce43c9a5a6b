"""Convert image collections into the datasets that train.py and fid.py read (dataset_tool.py's library).

A dataset is an uncompressed zip (or a folder) of PNGs named `{idx // 1000:05d}/img{idx:08d}.png`
plus `dataset.json` holding `{"labels": [[file name, label], ...]}` or `{"labels": null}`. For
the same input, the file names, pixels and labels are those NVIDIA EDM's dataset_tool.py writes.
"""

import contextlib
import gzip
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile

import numpy as np
import PIL.Image
import tqdm

import dnnlib
from training import safety
from training.dataset import DatasetError, is_image_file, read_image

#----------------------------------------------------------------------------
# Sources. Each opener returns (number of images, iterator of (name, image, label)) where `name`
# says where the image came from (for error messages), `image` is HWC uint8 with 1 or 3 channels
# and `label` is what goes into dataset.json, or None.

def _read_labels_json(f, where):
    """{file name: label} from a dataset.json file object; empty if it has no labels."""
    try:
        labels = safety.load_json_capped(f, where).get('labels')
    except safety.TooLarge as e:
        raise DatasetError(str(e)) from e
    except (ValueError, AttributeError) as e:
        raise DatasetError(f'Cannot read {where}: not a JSON object with a "labels" list') from e
    if labels is None:
        return dict()
    try:
        labels = {fname: label for fname, label in labels}
    except (TypeError, ValueError) as e:
        raise DatasetError(f'{where}: "labels" must be a list of [file name, label] pairs') from e
    for fname, label in labels.items():
        if not _valid_label(label):
            raise DatasetError(f'{where}: the label of {fname} is {json.dumps(label)}; labels are class indices (integers >= 0) '
                'or lists of finite numbers')
    return labels

def _valid_label(label):
    if isinstance(label, bool):
        return False
    if isinstance(label, int):
        return label >= 0
    if isinstance(label, list):
        return len(label) > 0 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in label)
    return False

def _check_all_labelled(labels, fnames, where):
    """Labels for some images but not for others would be dropped silently (EDM keeps none); refuse."""
    if not labels:
        return
    missing = [fname for fname in fnames if fname not in labels]
    if missing:
        raise DatasetError(f'{where} labels {len(fnames) - len(missing)} of the {len(fnames)} images but not {missing[0]}'
            + (f' and {len(missing) - 1} more' if len(missing) > 1 else '') + '; label every image or remove dataset.json')

def _folder_labels(fnames):
    """Class labels from top-level folder names (sorted names -> 0, 1, ...), or {} if there is just one."""
    toplevel = {fname: fname.split('/')[0] if '/' in fname else '' for fname in fnames}
    classes = {name: idx for idx, name in enumerate(sorted(set(toplevel.values())))}
    return {fname: classes[name] for fname, name in toplevel.items()} if len(classes) > 1 else dict()

def open_image_folder(path, max_images=None):
    """Images anywhere under `path`; labels from its dataset.json, else from top-level folder names."""
    fnames = [os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/')
        for root, _dirs, files in os.walk(path) for fname in files if is_image_file(fname)]
    # EDM sorts pathlib paths, which compare by components: 'a/b.png' comes before 'a-c.png'.
    fnames.sort(key=lambda fname: [os.path.normcase(part) for part in fname.split('/')])
    if len(fnames) == 0:
        raise DatasetError(f'No image files found in {path}')
    labels = dict()
    labels_fname = os.path.join(path, 'dataset.json')
    if os.path.isfile(labels_fname):
        with open(labels_fname, 'rb') as f:
            labels = _read_labels_json(f, labels_fname)
    if len(labels) == 0:
        labels = _folder_labels(fnames)
    fnames = fnames[:max_images]
    _check_all_labelled(labels, fnames, labels_fname)

    def iterate():
        for fname in fnames:
            name = os.path.join(path, fname)
            try:
                f = open(name, 'rb')
            except OSError as e:
                raise DatasetError(f'Cannot read image {name}: {e.strerror}') from e
            with f:
                yield name, read_image(f, name), labels.get(fname)
    return len(fnames), iterate()

def open_image_zip(path, max_images=None):
    """Images anywhere in the zip `path`; labels from its dataset.json."""
    try:
        with zipfile.ZipFile(path) as z:
            all_fnames = z.namelist()
            fnames = sorted(fname for fname in all_fnames if is_image_file(fname))
            labels = dict()
            if 'dataset.json' in all_fnames:
                with z.open('dataset.json') as f:
                    labels = _read_labels_json(f, f'dataset.json in {path}')
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f'{path} is not a readable zip file ({e})') from e
    if len(fnames) == 0:
        raise DatasetError(f'No image files found in {path}')
    fnames = fnames[:max_images]
    _check_all_labelled(labels, fnames, f'dataset.json in {path}')

    def iterate():
        with zipfile.ZipFile(path) as z:
            for fname in fnames:
                name = f'{fname} in {path}'
                try:
                    data = z.read(fname)
                except (zipfile.BadZipFile, OSError) as e:
                    raise DatasetError(f'Cannot read image {name}: {e}') from e
                yield name, read_image(io.BytesIO(data), name), labels.get(fname)
    return len(fnames), iterate()

def open_cifar10(path, max_images=None):
    """The 50,000 training images of CIFAR-10's python archive (cifar-10-python.tar.gz), with labels."""
    images = []
    labels = []
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for batch in range(1, 6):
                member_name = f'cifar-10-batches-py/data_batch_{batch}'
                try:
                    member = tar.getmember(member_name)
                except KeyError:
                    raise DatasetError(f'{path} is not the python version of CIFAR-10: it has no {member_name}') from None
                with tar.extractfile(member) as f:
                    data = safety.load_data_pickle(f, encoding='latin1') # Arrays and labels only: a tarball runs no code.
                if not isinstance(data, dict):
                    raise DatasetError(f'{member_name} in {path} holds a {type(data).__name__}, not a dict of images and labels')
                # Loaded with encoding='latin1' (as numpy arrays pickled by Python 2 need), the
                # official files have str keys; files written by Python 3 may have bytes keys.
                batch_images = np.asarray(data.get('data', data.get(b'data')), dtype=np.uint8)
                batch_labels = np.asarray(data.get('labels', data.get(b'labels')), dtype=np.int64)
                if batch_images.ndim != 2 or batch_images.shape[1] != 3 * 32 * 32 or batch_labels.shape != batch_images.shape[:1]:
                    raise DatasetError(f'{member_name} in {path} does not hold N 32x32 RGB images and N labels')
                images.append(batch_images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) # NCHW => NHWC
                labels.append(batch_labels)
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as e:
        raise DatasetError(f'Cannot read {path} as the python version of CIFAR-10 ({type(e).__name__}: {e})') from e
    images = np.concatenate(images)[:max_images]
    labels = np.concatenate(labels)[:max_images]

    def iterate():
        for idx, (image, label) in enumerate(zip(images, labels)):
            yield f'image {idx} of {path}', image, int(label)
    return len(images), iterate()

def _read_idx_gz(path, magic, what):
    """The array of an IDX file (MNIST's format): big-endian magic, dimensions, then uint8 data."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f'MNIST {what} file not found: {path}') from None
    except (OSError, EOFError) as e:
        raise DatasetError(f'Cannot read {path}: {e}') from e
    ndim = magic & 0xff
    header = np.frombuffer(data[:4 + 4 * ndim], dtype='>u4') if len(data) >= 4 + 4 * ndim else None
    if header is None or header[0] != magic:
        raise DatasetError(f'{path} is not an MNIST {what} file (IDX magic number {magic:#010x})')
    shape = [int(n) for n in header[1:]]
    if len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise DatasetError(f'{path} is truncated or has trailing data: its header says {"x".join(map(str, shape))} bytes')
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)

def open_mnist(images_path, max_images=None):
    """MNIST images (`*-images-idx3-ubyte.gz`) with labels from the matching `*-labels-idx1-ubyte.gz`.

    The 28x28 digits get a 2-pixel black border (32x32), as in EDM's tool, so that they halve
    cleanly through the network's resolutions.
    """
    labels_path = images_path[:-len('-images-idx3-ubyte.gz')] + '-labels-idx1-ubyte.gz'
    images = _read_idx_gz(images_path, 0x00000803, 'images')
    labels = _read_idx_gz(labels_path, 0x00000801, 'labels')
    if len(labels) != len(images):
        raise DatasetError(f'{images_path} has {len(images)} images, but {labels_path} has {len(labels)} labels')
    images = np.pad(images[:max_images], [(0, 0), (2, 2), (2, 2)], 'constant', constant_values=0)
    labels = labels[:max_images]

    def iterate():
        for idx, (image, label) in enumerate(zip(images, labels)):
            yield f'image {idx} of {images_path}', image[:, :, np.newaxis], int(label)
    return len(images), iterate()

def open_optdigits(path, max_images=None):
    """UCI "Optical Recognition of Handwritten Digits" (optdigits.tra / .tes, or the same rows
    as .csv / .csv.gz, e.g. scikit-learn's digits.csv.gz): per line 64 counts 0..16 of an 8x8
    image, then the class. Counts are stretched to 0..255 (16 -> 255)."""
    opener = gzip.open if path.lower().endswith('.gz') else open
    try:
        with opener(path, 'rt') as f:
            rows = np.loadtxt(f, delimiter=',', dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as e:
        raise DatasetError(f'Cannot read {path} as UCI optdigits rows of 64 pixel counts and a label: {e}') from e
    if rows.shape[1] != 65 or rows[:, :64].min() < 0 or rows[:, :64].max() > 16:
        raise DatasetError(f'{path} is not in UCI optdigits format: expected 65 comma-separated integers per line, pixels in 0..16')
    rows = rows[:max_images]
    images = np.round(rows[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)

    def iterate():
        for idx, (image, label) in enumerate(zip(images, rows[:, 64])):
            yield f'row {idx + 1} of {path}', image[:, :, np.newaxis], int(label)
    return len(images), iterate()

def open_source(path, max_images=None):
    """Pick the opener by what `path` is."""
    if os.path.isdir(path):
        return open_image_folder(path, max_images)
    if not os.path.exists(path):
        raise DatasetError(f'Source not found: {path}')
    name = os.path.basename(path).lower()
    if name.endswith('-images-idx3-ubyte.gz'):
        return open_mnist(path, max_images)
    if name.endswith(('.tar.gz', '.tgz')):
        return open_cifar10(path, max_images)
    if name.endswith('.zip'):
        return open_image_zip(path, max_images)
    if name.endswith(('.tra', '.tes', '.csv', '.csv.gz')):
        return open_optdigits(path, max_images)
    raise DatasetError(f'Unknown source {path}: expected an image folder, a .zip of images, '
        'cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or UCI optdigits rows (.tra, .tes, .csv, .csv.gz)')

#----------------------------------------------------------------------------
# Crop and resize, as EDM's tool does it: Pillow's Lanczos filter on uint8 images.

def _resize(image, width, height):
    pil = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    array = np.asarray(pil.resize((width, height), PIL.Image.Resampling.LANCZOS))
    return array[:, :, np.newaxis] if array.ndim == 2 else array

def _to_rgb(image):
    # The crop transforms of EDM's tool always output RGB; kept so that its datasets and ours agree.
    return image.repeat(3, axis=2) if image.shape[2] == 1 else image

def scale(image, width, height):
    """Resize to width x height (no-op without a size or at the same size)."""
    if width is None or (image.shape[1] == width and image.shape[0] == height):
        return image
    return _resize(image, width, height)

def center_crop(image, width, height):
    """Crop the largest centered square, then resize it to width x height."""
    crop = min(image.shape[:2])
    y0, x0 = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    return _resize(_to_rgb(image[y0 : y0 + crop, x0 : x0 + crop]), width, height)

def center_crop_wide(image, width, height):
    """Crop a centered width:height band, resize it to width x height and center it on a black
    width x width square; None (image skipped) if the image is too small for it."""
    crop_height = int(np.round(width * image.shape[0] / image.shape[1]))
    if image.shape[1] < width or crop_height < height:
        return None
    y0 = (image.shape[0] - crop_height) // 2
    band = _resize(_to_rgb(image[y0 : y0 + crop_height]), width, height)
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2] = band
    return canvas

TRANSFORMS = {None: scale, 'center-crop': center_crop, 'center-crop-wide': center_crop_wide}

def check_transform(transform, resolution):
    """DatasetError unless `transform` with `resolution` ((width, height) or None) gives square images."""
    if transform is not None and resolution is None:
        raise DatasetError(f'--transform={transform} needs --resolution=WxH')
    if resolution is not None:
        width, height = resolution
        if transform == 'center-crop-wide' and height > width:
            raise DatasetError(f'--transform=center-crop-wide makes images that are wider than tall, but --resolution is {width}x{height}')
        if transform != 'center-crop-wide' and width != height:
            raise DatasetError(f'--resolution must be square (e.g. {width}x{width}), not {width}x{height}; '
                'use --transform=center-crop-wide for a wide crop on a square canvas')

#----------------------------------------------------------------------------
# Output. Files go to a temporary zip or folder next to `dest`, which is renamed to `dest` only
# once everything is written, so an error or Ctrl-C never leaves a partial dataset behind.

@contextlib.contextmanager
def open_dest(dest):
    """Yield write(fname, data) into the dataset `dest`: an uncompressed zip if it ends in .zip,
    else a folder, which must not exist yet or be empty. An existing zip is replaced."""
    if dest == '':
        raise DatasetError('--dest must not be empty')
    if dest.lower().endswith('.zip'):
        if os.path.isdir(dest):
            raise DatasetError(f'--dest {dest} is a folder; give a new .zip file name or a folder name without .zip')
        with dnnlib.util.atomic_write(dest, fsync=True) as f, zipfile.ZipFile(f, mode='w', compression=zipfile.ZIP_STORED) as zf:
            yield zf.writestr
        return
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise DatasetError(f'--dest {dest} is an existing file; give a folder name, or a name ending in .zip')
    if os.path.isdir(dest) and len(os.listdir(dest)) != 0:
        raise DatasetError(f'--dest folder {dest} already has files in it; give a new or empty folder')
    parent = os.path.dirname(os.path.abspath(dest))
    dnnlib.util.remove_stale_temporaries(parent) # The hidden folders of killed earlier runs.
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(os.path.abspath(dest))}.', suffix='.tmp')
    try:
        os.chmod(tmp_dir, 0o777 & ~dnnlib.util.current_umask()) # mkdtemp makes the folder private.
        def write(fname, data):
            path = os.path.join(tmp_dir, fname)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data.encode('utf-8') if isinstance(data, str) else data)
        yield write
        if os.path.isdir(dest):
            os.rmdir(dest) # Empty, as checked above; rmdir fails rather than delete anything that appeared since.
        os.rename(tmp_dir, dest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

def encode_png(image):
    """HWC uint8 -> bytes of an uncompressed PNG (cheap to decode during training), as EDM writes them."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format='png', compress_level=0, optimize=False)
    return buffer.getbuffer()

def archive_fname(idx):
    return f'{idx // 1000:05d}/img{idx:08d}.png'

#----------------------------------------------------------------------------

def convert_dataset(source, dest, max_images=None, transform=None, resolution=None, progress=True):
    """Convert `source` into the dataset `dest`; DatasetError with a one-line reason on bad input.

    Output image `idx` is source image `idx` (in sorted order); images that center-crop-wide skips
    leave their number unused, as in EDM's tool.
    """
    check_transform(transform, resolution)
    width, height = resolution if resolution is not None else (None, None)
    with open_dest(dest) as write: # Checks --dest before reading the source, which may take a while.
        num_images, images = open_source(source, max_images)
        labels = []
        first_shape = None
        with tqdm.tqdm(total=num_images, unit='img', disable=not progress) as progress_bar:
            for idx, (name, image, label) in enumerate(images):
                progress_bar.update(1)
                image = TRANSFORMS[transform](image, width, height)
                if image is None:
                    continue
                h, w, c = image.shape
                if first_shape is None:
                    first_shape = image.shape
                    if w != h:
                        raise DatasetError(f'Images must be square, but {name} is {w}x{h}; use --transform=center-crop --resolution=NxN')
                elif image.shape != first_shape:
                    raise DatasetError(f'{name} is {w}x{h} with {c} channels' + (' after the transform' if resolution else '') +
                        f', but the first image is {first_shape[1]}x{first_shape[0]} with {first_shape[2]}; '
                        'all images must have the same size (use --resolution to resize them)')
                write(archive_fname(idx), encode_png(image))
                labels.append([archive_fname(idx), label] if label is not None else None)
        if first_shape is None:
            raise DatasetError(f'Every image of {source} is smaller than --resolution={width}x{height}; nothing to write')
        write('dataset.json', json.dumps({'labels': labels if all(x is not None for x in labels) else None}))

#----------------------------------------------------------------------------

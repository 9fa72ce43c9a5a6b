"""dataset_tool.py turns CIFAR-10, MNIST, folders and zips into datasets that ImageFolderDataset reads back exactly."""

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Inputs in the layouts of the real downloads, written by the tests themselves.

def random_images(n, h, w, c, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=[n, h, w, c]).astype(np.uint8)

def write_cifar10(path, images, labels, bytes_keys=False):
    """cifar-10-python.tar.gz: cifar-10-batches-py/data_batch_1..5, each a pickled dict whose 'data'
    is uint8 [N, 3072] (channel-major rows) and 'labels' a list of ints; the images split over 5 batches."""
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    with tarfile.open(path, 'w:gz') as tar:
        for batch, idx in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
            data = {key('batch_label'): f'training batch {batch} of 5', key('labels'): [int(labels[i]) for i in idx],
                key('data'): images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1), key('filenames'): [f'img{i}.png' for i in idx]}
            raw = pickle.dumps(data, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)

def write_mnist(folder, images, labels, with_labels=True):
    """train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz: big-endian IDX headers, then bytes."""
    os.makedirs(folder, exist_ok=True)
    n, h, w = images.shape
    with gzip.open(os.path.join(folder, 'train-images-idx3-ubyte.gz'), 'wb') as f:
        f.write(np.array([0x803, n, h, w], '>u4').tobytes() + images.tobytes())
    if with_labels:
        with gzip.open(os.path.join(folder, 'train-labels-idx1-ubyte.gz'), 'wb') as f:
            f.write(np.array([0x801, n], '>u4').tobytes() + np.asarray(labels, np.uint8).tobytes())
    return os.path.join(folder, 'train-images-idx3-ubyte.gz')

def write_folder(folder, files):
    """{relative name: HWC uint8 image or raw bytes} as image files (format from the extension)."""
    for name, image in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(image, bytes):
            with open(path, 'wb') as f:
                f.write(image)
        else:
            PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path)
    return str(folder)

def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, [str(arg) for arg in args])

def read_all(path, **kwargs):
    dataset = ImageFolderDataset(str(path), **kwargs)
    items = [dataset[i] for i in range(len(dataset))]
    return dataset, np.stack([image for image, _ in items]), np.stack([label for _, label in items])

def dataset_json(path):
    if str(path).endswith('.zip'):
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read('dataset.json'))
    with open(os.path.join(path, 'dataset.json')) as f:
        return json.load(f)

def names(n):
    return [f'{i // 1000:05d}/img{i:08d}.png' for i in range(n)]

@pytest.fixture
def cifar(tmp_path):
    images = random_images(10, 32, 32, 3)
    labels = np.random.RandomState(1).randint(0, 10, size=10)
    return write_cifar10(tmp_path / 'cifar-10-python.tar.gz', images, labels), images, labels

@pytest.fixture
def mnist(tmp_path):
    images = random_images(7, 28, 28, 1, seed=2)[:, :, :, 0]
    labels = np.array([3, 1, 4, 1, 5, 9, 2])
    return write_mnist(tmp_path / 'mnist', images, labels), images, labels

#----------------------------------------------------------------------------

@pytest.mark.parametrize('dest_name', ['cifar10-32x32.zip', 'cifar10-32x32'])
def test_cifar10_round_trips_with_labels(tmp_path, cifar, dest_name):
    source, images, labels = cifar
    dest = tmp_path / 'out' / dest_name
    result = run_tool('--source', source, '--dest', dest)
    assert result.exit_code == 0, result.output
    dataset, got_images, got_labels = read_all(dest, use_labels=True)
    assert np.array_equal(got_images, images.transpose(0, 3, 1, 2))
    assert np.array_equal(got_labels.argmax(axis=1), labels) and dataset.label_dim == labels.max() + 1
    assert dataset_json(dest) == {'labels': [[name, int(label)] for name, label in zip(names(10), labels)]}
    assert dataset.image_fnames == names(10)
    if dest_name.endswith('.zip'):
        with zipfile.ZipFile(dest) as z:
            assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
    assert sorted(os.listdir(tmp_path / 'out')) == [dest_name] # No temporary files left next to it.

def test_cifar10_pickles_with_bytes_keys_work_too(tmp_path):
    images = random_images(5, 32, 32, 3, seed=4)
    source = write_cifar10(tmp_path / 'cifar-10-python.tar.gz', images, [0, 1, 2, 3, 4], bytes_keys=True)
    assert run_tool('--source', source, '--dest', tmp_path / 'c.zip').exit_code == 0
    assert np.array_equal(read_all(tmp_path / 'c.zip')[1], images.transpose(0, 3, 1, 2))

def test_mnist_gets_a_two_pixel_black_border_and_its_labels(tmp_path, mnist):
    source, images, labels = mnist
    result = run_tool('--source', source, '--dest', tmp_path / 'mnist.zip')
    assert result.exit_code == 0, result.output
    dataset, got_images, got_labels = read_all(tmp_path / 'mnist.zip', use_labels=True)
    assert dataset.image_shape == [1, 32, 32]
    assert np.array_equal(got_images[:, 0, 2:30, 2:30], images)
    border = np.ones([32, 32], bool)
    border[2:30, 2:30] = False
    assert not got_images[:, 0, border].any()
    assert np.array_equal(got_labels.argmax(axis=1), labels)

def test_max_images_keeps_the_first_images(tmp_path, cifar):
    source, images, labels = cifar
    assert run_tool('--source', source, '--dest', tmp_path / 'c', '--max-images', 4).exit_code == 0
    dataset, got_images, _ = read_all(tmp_path / 'c')
    assert np.array_equal(got_images, images[:4].transpose(0, 3, 1, 2))
    assert dataset_json(tmp_path / 'c') == {'labels': [[name, int(label)] for name, label in zip(names(4), labels[:4])]}

def test_center_crop_takes_the_middle_square_of_non_square_images(tmp_path):
    images = random_images(3, 16, 24, 3, seed=5) # 24 wide, 16 high.
    source = write_folder(tmp_path / 'photos', {f'p{i}.png': image for i, image in enumerate(images)})
    result = run_tool('--source', source, '--dest', tmp_path / 'crop.zip', '--transform', 'center-crop', '--resolution', '16x16')
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_all(tmp_path / 'crop.zip')[1], images[:, :, 4:20].transpose(0, 3, 1, 2))
    result = run_tool('--source', source, '--dest', tmp_path / 'small.zip', '--transform', 'center-crop', '--resolution', '8x8')
    assert result.exit_code == 0, result.output
    dataset, small, _ = read_all(tmp_path / 'small.zip')
    assert dataset.image_shape == [3, 8, 8]
    # Lanczos downscaling keeps the mean color of smooth images; of noise, roughly.
    assert np.abs(small.mean(axis=(2, 3)) - images[:, :, 4:20].mean(axis=(1, 2))).max() < 8

def test_center_crop_wide_letterboxes_and_skips_images_too_small(tmp_path):
    images = random_images(2, 16, 32, 3, seed=6)
    files = {'a.png': images[0], 'b.png': random_images(1, 4, 8, 3)[0], 'c.png': images[1]}
    source = write_folder(tmp_path / 'wide', files)
    result = run_tool('--source', source, '--dest', tmp_path / 'w', '--transform', 'center-crop-wide', '--resolution', '32x16')
    assert result.exit_code == 0, result.output
    dataset, got, _ = read_all(tmp_path / 'w')
    assert dataset.image_fnames == ['00000/img00000000.png', '00000/img00000002.png'] # b.png is too small: skipped.
    assert got.shape == (2, 3, 32, 32) and not got[:, :, :8].any() and not got[:, :, 24:].any()
    assert np.array_equal(got[:, :, 8:24], images.transpose(0, 3, 1, 2)) # Already 32x16: no resizing.

def test_resolution_resizes_and_keeps_grayscale_single_channel(tmp_path, mnist):
    source, _images, _labels = mnist
    assert run_tool('--source', source, '--dest', tmp_path / 'm16.zip', '--resolution', '16x16').exit_code == 0
    assert ImageFolderDataset(str(tmp_path / 'm16.zip')).image_shape == [1, 16, 16]

def test_folder_labels_come_from_dataset_json_or_class_subfolders(tmp_path):
    images = random_images(4, 8, 8, 3, seed=7)
    files = {'dog/1.png': images[0], 'cat/2.png': images[1], 'cat/1.png': images[2], 'dog-x/0.png': images[3]}
    classes = write_folder(tmp_path / 'classes', files)
    assert run_tool('--source', classes, '--dest', tmp_path / 'by_folder.zip').exit_code == 0
    # Sorted by path components (cat/, dog/, dog-x/) as EDM's tool sorts; classes by sorted folder name.
    _, got, _ = read_all(tmp_path / 'by_folder.zip')
    assert np.array_equal(got, images[[2, 1, 0, 3]].transpose(0, 3, 1, 2))
    assert [label for _, label in dataset_json(tmp_path / 'by_folder.zip')['labels']] == [0, 0, 1, 2]

    with open(os.path.join(classes, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[name, [i, 0.5]] for i, name in enumerate(sorted(files))]}, f)
    assert run_tool('--source', classes, '--dest', tmp_path / 'by_json.zip').exit_code == 0
    _, _, got_labels = read_all(tmp_path / 'by_json.zip', use_labels=True)
    assert np.array_equal(got_labels, [[0, 0.5], [1, 0.5], [3, 0.5], [2, 0.5]]) # dog/ before dog-x/, unlike in string order.

    flat = write_folder(tmp_path / 'flat', {'1.png': images[0], '2.png': images[1]})
    assert run_tool('--source', flat, '--dest', tmp_path / 'flat.zip').exit_code == 0
    assert dataset_json(tmp_path / 'flat.zip') == {'labels': None}

def test_a_dataset_zip_converts_to_the_same_dataset(tmp_path, cifar):
    source, images, labels = cifar
    assert run_tool('--source', source, '--dest', tmp_path / 'a.zip').exit_code == 0
    assert run_tool('--source', tmp_path / 'a.zip', '--dest', tmp_path / 'b').exit_code == 0
    _, a_images, a_labels = read_all(tmp_path / 'a.zip', use_labels=True)
    _, b_images, b_labels = read_all(tmp_path / 'b', use_labels=True)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)

def test_uci_optdigits_rows_become_labelled_grayscale_images(tmp_path):
    counts = np.random.RandomState(3).randint(0, 17, size=[4, 64])
    labels = np.array([7, 0, 9, 3])
    source = tmp_path / 'optdigits.csv.gz'
    with gzip.open(source, 'wt') as f:
        f.writelines(','.join(map(str, list(row) + [label])) + '\n' for row, label in zip(counts, labels))
    assert run_tool('--source', source, '--dest', tmp_path / 'digits.zip').exit_code == 0
    dataset, images, onehot = read_all(tmp_path / 'digits.zip', use_labels=True)
    assert images.shape == (4, 1, 8, 8)
    assert np.array_equal(images[:, 0], np.round(counts.reshape(4, 8, 8) * 255 / 16).astype(np.uint8)) # 16 -> 255.
    assert np.array_equal(onehot.argmax(axis=1), labels) and dataset.label_dim == 10
    assert run_tool('--source', source, '--dest', tmp_path / 'digits16.zip', '--resolution', '16x16').exit_code == 0
    assert read_all(tmp_path / 'digits16.zip')[1].shape == (4, 1, 16, 16)

def test_help_shows_examples():
    result = run_tool('--help')
    assert result.exit_code == 0
    for example in ['cifar-10-python.tar.gz', 'images1024x1024', '--resolution=64x64', 'train-images-idx3-ubyte.gz']:
        assert example in result.output

#----------------------------------------------------------------------------
# Bad input: exit code non-zero, one line that says what is wrong, and nothing written.

def _folder_with(t, files):
    return write_folder(t / 'src', files)

def _rgb(h=8, w=8, seed=0):
    return random_images(1, h, w, 3, seed)[0]

BAD_INPUTS = {
    'missing source':       (lambda t: ['--source', t / 'nope'], 'Source not found'),
    'unknown source':       (lambda t: ['--source', (t / 'a.txt').write_text('x') and t / 'a.txt'], 'Unknown source'),
    'empty folder':         (lambda t: ['--source', _folder_with(t, {'notes.txt': b'no images'})], 'No image files'),
    'unreadable image':     (lambda t: ['--source', _folder_with(t, {'a.png': _rgb(), 'b/bad.png': b'not a png'})], 'bad.png'),
    'transparent image':    (lambda t: ['--source', _folder_with(t, {'a.png': np.zeros([8, 8, 4], np.uint8)})], 'transparent'),
    'non-square':           (lambda t: ['--source', _folder_with(t, {'a.png': _rgb(8, 12)})], 'must be square'),
    'mixed sizes':          (lambda t: ['--source', _folder_with(t, {'a.png': _rgb(), 'b.png': _rgb(), 'c.png': _rgb(16, 16)})], r'c.png is 16x16'),
    'mixed channels':       (lambda t: ['--source', _folder_with(t, {'a.png': _rgb(), 'b.png': np.zeros([8, 8, 1], np.uint8)})], 'b.png is 8x8 with 1 channels'),
    'crop, no resolution':  (lambda t: ['--source', _folder_with(t, {'a.png': _rgb()}), '--transform', 'center-crop'], 'needs --resolution'),
    'non-square output':    (lambda t: ['--source', _folder_with(t, {'a.png': _rgb()}), '--resolution', '16x8'], 'must be square'),
    'bad resolution':       (lambda t: ['--source', _folder_with(t, {'a.png': _rgb()}), '--resolution', '64'], 'not a size like 64x64'),
    'max-images 0':         (lambda t: ['--source', _folder_with(t, {'a.png': _rgb()}), '--max-images', '0'], 'max-images'),
    'all too small':        (lambda t: ['--source', _folder_with(t, {'a.png': _rgb()}), '--transform', 'center-crop-wide', '--resolution', '32x16'], 'smaller than'),
    'mnist, no labels':     (lambda t: ['--source', write_mnist(t / 'm', np.zeros([2, 28, 28], np.uint8), None, with_labels=False)], 'labels file not found'),
    'not cifar':            (lambda t: ['--source', _tarball_without_cifar(t)], 'no cifar-10-batches-py/data_batch_1'),
    'damaged tar.gz':       (lambda t: ['--source', (t / 'x.tar.gz').write_bytes(b'\x1f\x8b garbage') and t / 'x.tar.gz'], 'Cannot read'),
    'optdigits, 64 values': (lambda t: ['--source', (t / 'd.csv').write_text('1,' * 63 + '1\n') and t / 'd.csv'], 'UCI optdigits format'),
    'optdigits, count 17':  (lambda t: ['--source', (t / 'd.csv').write_text('17,' * 64 + '3\n') and t / 'd.csv'], 'UCI optdigits format'),
}

def _tarball_without_cifar(t):
    with tarfile.open(t / 'other.tar.gz', 'w:gz') as tar:
        info = tarfile.TarInfo('readme.txt')
        tar.addfile(info, io.BytesIO(b''))
    return t / 'other.tar.gz'

@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, case, dest_name):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / 'dest'
    out.mkdir()
    result = run_tool(*make_args(tmp_path), '--dest', out / dest_name)
    assert result.exit_code != 0
    last_line = result.stderr.rstrip('\n').split('\n')[-1]
    assert last_line.startswith('Error: ') and message in last_line, result.output
    assert 'Traceback' not in result.output
    assert os.listdir(out) == []

def test_a_folder_dest_with_files_is_refused_and_left_alone(tmp_path, cifar):
    source, _images, _labels = cifar
    dest = tmp_path / 'dest'
    dest.mkdir()
    (dest / 'keep.txt').write_text('mine')
    result = run_tool('--source', source, '--dest', dest)
    assert result.exit_code != 0 and 'already has files' in result.stderr.splitlines()[-1]
    assert os.listdir(dest) == ['keep.txt'] and (dest / 'keep.txt').read_text() == 'mine'

def test_an_existing_zip_is_replaced_only_by_a_complete_dataset(tmp_path, cifar):
    source, images, _labels = cifar
    dest = tmp_path / 'data.zip'
    assert run_tool('--source', source, '--dest', dest, '--max-images', 3).exit_code == 0
    before = dest.read_bytes()
    bad = write_folder(tmp_path / 'bad', {'a.png': _rgb(32, 32), 'b.png': _rgb(16, 16)})
    assert run_tool('--source', bad, '--dest', dest).exit_code != 0
    assert dest.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['bad', 'cifar-10-python.tar.gz', 'data.zip']
    assert run_tool('--source', source, '--dest', dest).exit_code == 0
    assert len(ImageFolderDataset(str(dest))) == 10

@pytest.mark.slow
def test_the_script_prints_one_error_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, 'dataset_tool.py'), '--source', str(tmp_path / 'missing'),
        '--dest', str(tmp_path / 'out.zip')], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f'Error: Source not found: {tmp_path / "missing"}']
    assert not (tmp_path / 'out.zip').exists()

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# The conversion is a library (training/dataset_conversion.py) that scripts call without click.

def test_the_library_writes_what_the_cli_writes(tmp_path):
    from training.dataset_conversion import convert_dataset
    images = random_images(7, 8, 8, 3, seed=3)
    source = write_folder(tmp_path / 'src', {f'a/{i}.png': image for i, image in enumerate(images)})
    convert_dataset(source, str(tmp_path / 'lib.zip'), progress=False)
    assert run_tool('--source', source, '--dest', tmp_path / 'cli.zip').exit_code == 0
    _, lib_images, _ = read_all(tmp_path / 'lib.zip')
    _, cli_images, _ = read_all(tmp_path / 'cli.zip')
    np.testing.assert_array_equal(lib_images, cli_images)
    np.testing.assert_array_equal(lib_images, images.transpose(0, 3, 1, 2))

def test_the_library_raises_a_dataset_error_not_a_click_one(tmp_path):
    from training.dataset import DatasetError
    from training.dataset_conversion import convert_dataset
    with pytest.raises(DatasetError, match='not found'):
        convert_dataset(str(tmp_path / 'nowhere'), str(tmp_path / 'out.zip'), progress=False)
    assert not os.path.exists(tmp_path / 'out.zip')

"""ImageFolderDataset reads folders and zips of images the way training and fid.py need them."""

import io
import json
import multiprocessing
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from training.dataset import DatasetError, ImageFolderDataset, iterate_image_batches, rank_batch_indices

#----------------------------------------------------------------------------
# Datasets written directly with Pillow, independent of dataset_tool.py.

def random_images(n, h=8, w=8, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=[n, h, w, c]).astype(np.uint8)

def png_bytes(image):
    buffer = io.BytesIO()
    PIL.Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buffer, format='png')
    return buffer.getvalue()

def standard_names(n):
    return [f'{i // 1000:05d}/img{i:08d}.png' for i in range(n)]

def write_dataset(path, files, labels=None, meta=None):
    """Write {name: image array or raw bytes} plus dataset.json to a folder, or a zip if path ends in .zip."""
    path = str(path)
    contents = {name: data if isinstance(data, bytes) else png_bytes(data) for name, data in files.items()}
    if labels is not None or meta is not None:
        meta = meta if meta is not None else {'labels': [[name, label] for name, label in labels.items()]}
        contents['dataset.json'] = json.dumps(meta).encode()
    if path.endswith('.zip'):
        with zipfile.ZipFile(path, 'w') as z:
            for name, data in contents.items():
                z.writestr(name, data)
    else:
        for name, data in contents.items():
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), 'wb') as f:
                f.write(data)
    return path

def labeled_dataset(tmp_path, kind='zip', n=12, num_classes=4):
    images = random_images(n)
    labels = [i % num_classes for i in range(n)]
    names = standard_names(n)
    path = write_dataset(tmp_path / ('data.zip' if kind == 'zip' else 'data'), dict(zip(names, images)), dict(zip(names, labels)))
    return path, images, labels

def all_items(dataset):
    return [dataset[i] for i in range(len(dataset))]

#----------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['zip', 'dir'])
def test_items_are_the_stored_pixels_as_chw_with_one_hot_labels(tmp_path, kind):
    path, images, labels = labeled_dataset(tmp_path, kind)
    dataset = ImageFolderDataset(path, use_labels=True)
    assert len(dataset) == len(images)
    assert (dataset.name, dataset.image_shape, dataset.num_channels, dataset.resolution) == ('data', [3, 8, 8], 3, 8)
    assert dataset.label_shape == [4] and dataset.label_dim == 4 and dataset.has_labels and dataset.has_onehot_labels
    for i, (image, label) in enumerate(all_items(dataset)):
        assert image.dtype == np.uint8 and np.array_equal(image, images[i].transpose(2, 0, 1))
        assert label.dtype == np.float32 and np.array_equal(label, np.eye(4, dtype=np.float32)[labels[i]])
        assert np.array_equal(dataset.get_label(i), label)

def test_images_are_found_recursively_in_sorted_order(tmp_path):
    names = ['b/2.png', 'a/x/1.png', 'a/0.png', 'c.png']
    images = random_images(len(names))
    path = write_dataset(tmp_path / 'gen', dict(zip(names, images)))
    (tmp_path / 'gen' / 'notes.txt').write_text('not an image')
    dataset = ImageFolderDataset(path)
    assert dataset.image_fnames == sorted(names)
    for i, name in enumerate(sorted(names)):
        assert np.array_equal(dataset[i][0], images[names.index(name)].transpose(2, 0, 1))

def test_grayscale_images_have_one_channel(tmp_path):
    images = random_images(3, c=1)
    dataset = ImageFolderDataset(write_dataset(tmp_path / 'gray.zip', dict(zip(standard_names(3), images))))
    assert dataset.image_shape == [1, 8, 8]
    assert np.array_equal(dataset[2][0], images[2].transpose(2, 0, 1))

def test_palette_and_opaque_rgba_images_are_read_as_rgb(tmp_path):
    rgb = random_images(2, seed=1)
    palette = PIL.Image.fromarray(rgb[0]).quantize(colors=16)
    files = {'p.png': io.BytesIO(), 'rgba.png': io.BytesIO()}
    palette.save(files['p.png'], format='png')
    PIL.Image.fromarray(np.concatenate([rgb[1], np.full([8, 8, 1], 255, np.uint8)], axis=2)).save(files['rgba.png'], format='png')
    dataset = ImageFolderDataset(write_dataset(tmp_path / 'modes', {k: v.getvalue() for k, v in files.items()}))
    assert dataset.image_shape == [3, 8, 8]
    assert np.array_equal(dataset[0][0], np.asarray(palette.convert('RGB')).transpose(2, 0, 1))
    assert np.array_equal(dataset[1][0], rgb[1].transpose(2, 0, 1))

def test_vector_labels_are_returned_as_float32_vectors(tmp_path):
    names = standard_names(3)
    labels = {name: [i, 0.5, -1.25] for i, name in enumerate(names)}
    dataset = ImageFolderDataset(write_dataset(tmp_path / 'v.zip', dict(zip(names, random_images(3))), labels), use_labels=True)
    assert dataset.label_shape == [3] and not dataset.has_onehot_labels
    assert np.array_equal(dataset[2][1], np.array([2, 0.5, -1.25], np.float32)) and dataset[2][1].dtype == np.float32

@pytest.mark.parametrize('meta', [None, {'labels': None}])
def test_without_labels_the_label_has_dimension_zero(tmp_path, meta):
    path = write_dataset(tmp_path / 'u.zip', dict(zip(standard_names(2), random_images(2))), meta=meta)
    dataset = ImageFolderDataset(path)
    assert dataset.label_shape == [0] and dataset.label_dim == 0 and not dataset.has_labels
    assert dataset[0][1].shape == (0,) and dataset[0][1].dtype == np.float32

def test_labels_exist_but_are_off_unless_asked_for(tmp_path):
    path, _images, _labels = labeled_dataset(tmp_path)
    dataset = ImageFolderDataset(path)
    assert not dataset.has_labels and dataset[0][1].shape == (0,)

def test_xflip_appends_a_mirrored_copy_of_every_image(tmp_path):
    path, images, labels = labeled_dataset(tmp_path, n=5)
    dataset = ImageFolderDataset(path, use_labels=True, xflip=True)
    assert len(dataset) == 10
    for i in range(5):
        image, label = dataset[i]
        flipped, flipped_label = dataset[5 + i]
        assert np.array_equal(flipped, image[:, :, ::-1]) and not np.array_equal(flipped, image)
        assert np.array_equal(flipped_label, label)
        details = dataset.get_details(5 + i)
        assert (details.raw_idx, details.xflip, int(details.raw_label)) == (i, True, labels[i])
        assert dataset.get_details(i).xflip is False

def test_max_size_takes_a_reproducible_random_subset(tmp_path):
    path, images, labels = labeled_dataset(tmp_path, n=30)
    def subset(**kwargs):
        dataset = ImageFolderDataset(path, use_labels=True, max_size=6, **kwargs)
        return dataset, [dataset.get_details(i).raw_idx for i in range(len(dataset))]
    dataset, raw = subset(random_seed=1)
    assert len(raw) == 6 and raw == sorted(set(raw)) and raw != list(range(6))
    assert subset(random_seed=1)[1] == raw and subset(random_seed=2)[1] != raw
    for i, r in enumerate(raw):
        assert np.array_equal(dataset[i][0], images[r].transpose(2, 0, 1)) and dataset[i][1].argmax() == labels[r]
    flipped, flipped_raw = subset(random_seed=1, xflip=True)
    assert len(flipped) == 12 and flipped_raw == raw + raw
    assert len(ImageFolderDataset(path, max_size=100)) == 30

def test_cache_keeps_decoded_images_in_memory(tmp_path):
    path, images, _labels = labeled_dataset(tmp_path, kind='dir', n=4)
    cached = ImageFolderDataset(path, cache=True)
    uncached = ImageFolderDataset(path, cache=False)
    first = all_items(cached)
    uncached[0]
    for name in standard_names(4):
        os.remove(os.path.join(path, name))
    for before, after in zip(first, all_items(cached)):
        assert np.array_equal(before[0], after[0])
    with pytest.raises(DatasetError, match='00000/img00000001.png'):
        uncached[1]

def test_cached_images_are_not_changed_by_callers(tmp_path):
    path, images, _labels = labeled_dataset(tmp_path, n=2)
    dataset = ImageFolderDataset(path, cache=True, xflip=True)
    dataset[0][0][:] = 0
    dataset[2][0][:] = 0
    assert np.array_equal(dataset[0][0], images[0].transpose(2, 0, 1))

#----------------------------------------------------------------------------
# Worker processes and EDM's dataset_kwargs.

@pytest.mark.parametrize('context', ['fork', pytest.param('spawn', marks=pytest.mark.slow)]) # spawn: fresh interpreters, slow.
def test_dataloader_workers_read_the_same_batches(tmp_path, context):
    path, images, labels = labeled_dataset(tmp_path, n=10)
    dataset = ImageFolderDataset(path, use_labels=True, xflip=True)
    dataset[0] # Opens the zip in this process before the workers start.
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context=context)
    got_images, got_labels = zip(*loader)
    expected = all_items(dataset)
    assert torch.equal(torch.cat(got_images), torch.as_tensor(np.stack([x for x, _ in expected])))
    assert torch.equal(torch.cat(got_labels), torch.as_tensor(np.stack([y for _, y in expected])))

def test_pickled_dataset_reads_the_same_items(tmp_path):
    path, images, labels = labeled_dataset(tmp_path, n=4)
    dataset = ImageFolderDataset(path, use_labels=True, max_size=3, random_seed=7, xflip=True)
    dataset[0]
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(copy) == len(dataset)
    for (a, la), (b, lb) in zip(all_items(dataset), all_items(copy)):
        assert np.array_equal(a, b) and np.array_equal(la, lb)
    dataset.close()
    assert np.array_equal(dataset[1][0], copy[1][0]) # Reopens the zip after close().

def test_edm_snapshot_dataset_kwargs_rebuild_the_dataset(tmp_path):
    path, images, labels = labeled_dataset(tmp_path, n=6)
    # What an NVIDIA EDM snapshot holds after train.py has filled in resolution and max_size.
    dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=path, use_labels=True,
        xflip=False, cache=True, resolution=8, max_size=6)
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    assert isinstance(dataset, ImageFolderDataset) and len(dataset) == 6 and dataset.label_dim == 4
    assert np.array_equal(dataset[5][0], images[5].transpose(2, 0, 1))
    assert len(ImageFolderDataset(path, use_pyspng=False)) == 6

#----------------------------------------------------------------------------
# Reading whole datasets in batches, split over ranks.

def test_rank_batches_cover_every_image_once():
    for num_images, batch_size, world_size in [(10, 3, 1), (10, 3, 3), (2, 4, 4), (64, 64, 2)]:
        shares = [rank_batch_indices(num_images, batch_size, rank, world_size) for rank in range(world_size)]
        indices = torch.cat([batch for share in shares for batch in share]).tolist()
        assert sorted(indices) == list(range(num_images))
        assert all(0 < len(batch) <= batch_size for share in shares for batch in share)

def test_iterate_image_batches_reads_a_generated_image_folder(tmp_path):
    names = [f'{seed - seed % 1000:06d}/{seed:06d}.png' for seed in [0, 1, 2, 999, 1000, 1001, 2500]]
    images = random_images(len(names), seed=3)
    path = write_dataset(tmp_path / 'generated', dict(zip(names, images)))
    seen = []
    for rank in range(2):
        for batch, labels in iterate_image_batches(path, batch_size=2, rank=rank, world_size=2, num_workers=0):
            assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 8, 8) and labels.shape == (len(batch), 0)
            seen.extend(batch.numpy())
    assert len(seen) == len(names)
    assert sorted(x.tobytes() for x in seen) == sorted(x.transpose(2, 0, 1).tobytes() for x in images)

def test_iterate_image_batches_reports_a_bad_image_in_a_worker_in_one_line(tmp_path):
    files = dict(zip(standard_names(6), random_images(6)))
    files['00000/img00000004.png'] = random_images(1, h=16, w=16)[0]
    path = write_dataset(tmp_path / 'mixed.zip', files)
    children = set(multiprocessing.active_children())
    with pytest.raises(DatasetError) as info:
        for _batch in iterate_image_batches(path, batch_size=2, num_workers=2):
            pass
    message = str(info.value)
    assert '\n' not in message and '00000/img00000004.png' in message and '16x16' in message
    assert set(multiprocessing.active_children()) <= children # The workers have stopped, not left for the garbage collector.

#----------------------------------------------------------------------------
# Bad input: one-line DatasetErrors that say what is wrong and where.

def _zip_with(tmp_path, files, **kwargs):
    return write_dataset(tmp_path / 'bad.zip', files, **kwargs)

BAD_DATASETS = {
    'missing path':         (lambda t: str(t / 'nope.zip'), {}, 'not found'),
    'not a zip':            (lambda t: (t / 'x.tar').write_bytes(b'abc') and str(t / 'x.tar'), {}, 'neither a folder nor a .zip'),
    'damaged zip':          (lambda t: (t / 'x.zip').write_bytes(b'PK\x03\x04 not really') and str(t / 'x.zip'), {}, 'not a readable zip'),
    'no images':            (lambda t: write_dataset(t / 'empty', {'readme.txt': b'hello'}), {}, 'No image files'),
    'unreadable image':     (lambda t: _zip_with(t, {'a/broken.png': b'\x89PNG\r\n\x1a\n garbage'}), {}, 'a/broken.png'),
    'non-square':           (lambda t: _zip_with(t, {'wide.png': random_images(1, h=8, w=12)[0]}), {}, 'wide.png .*12x8'),
    'wrong resolution':     (lambda t: _zip_with(t, {'a.png': random_images(1)[0]}), dict(resolution=16), 'resolution 16'),
    'transparent':          (lambda t: _zip_with(t, {'t.png': np.zeros([8, 8, 4], np.uint8)}), {}, 't.png .*has transparent pixels'),
    '16-bit':               (lambda t: _zip_with(t, {'d.png': png_bytes(np.zeros([8, 8], np.uint16))}), {}, 'd.png .*has unsupported image mode'),
    'labels asked, none':   (lambda t: _zip_with(t, {'a.png': random_images(1)[0]}), dict(use_labels=True), 'has no labels'),
    'labels asked, null':   (lambda t: _zip_with(t, {'a.png': random_images(1)[0]}, meta={'labels': None}), dict(use_labels=True), 'has no labels'),
    'label missing':        (lambda t: _zip_with(t, dict(zip(['a.png', 'b.png'], random_images(2))), labels={'a.png': 1}), dict(use_labels=True), 'no label for b.png'),
    'negative label':       (lambda t: _zip_with(t, {'a.png': random_images(1)[0]}, labels={'a.png': -1}), dict(use_labels=True), 'must not be negative'),
    'ragged labels':        (lambda t: _zip_with(t, dict(zip(['a.png', 'b.png'], random_images(2))), labels={'a.png': [1, 2], 'b.png': [1]}), dict(use_labels=True), 'fixed length'),
    'damaged dataset.json': (lambda t: _zip_with(t, {'a.png': random_images(1)[0], 'dataset.json': b'{"labels": ['}), dict(use_labels=True), 'Cannot read dataset.json'),
}

@pytest.mark.parametrize('case', list(BAD_DATASETS))
def test_bad_datasets_give_a_one_line_error(tmp_path, case):
    make, kwargs, pattern = BAD_DATASETS[case]
    with pytest.raises(DatasetError, match=pattern) as info:
        ImageFolderDataset(make(tmp_path), **kwargs)
    assert '\n' not in str(info.value)

def test_an_image_of_another_size_is_reported_when_it_is_read(tmp_path):
    files = dict(zip(standard_names(3), random_images(3)))
    files['00000/img00000001.png'] = random_images(1, c=1)[0]
    dataset = ImageFolderDataset(write_dataset(tmp_path / 'mixed', files))
    dataset[0]
    with pytest.raises(DatasetError, match='00000/img00000001.png .* 1 channels') as info:
        dataset[1]
    assert '\n' not in str(info.value)

#----------------------------------------------------------------------------

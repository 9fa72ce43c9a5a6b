"""Throughput of dataset_tool.py and ImageFolderDataset on a synthetic CIFAR-10-sized archive.

Writes random 32x32 RGB images in the layout of cifar-10-python.tar.gz to a temporary folder,
converts them to a zip, then reads that zip back. Prints the median of --repeats runs.

    python benchmarks/dataset_io.py --num=50000 --repeats=3
"""

import io
import os
import pickle
import sys
import tarfile
import tempfile

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_seconds
from training import dataset_conversion
from training.dataset import ImageFolderDataset, iterate_image_batches

#----------------------------------------------------------------------------

def write_synthetic_cifar10(path, num_images, seed=0):
    rnd = np.random.RandomState(seed)
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
        for batch, idx in enumerate(np.array_split(np.arange(num_images), 5), start=1):
            data = {'data': rnd.randint(0, 256, size=[len(idx), 3072]).astype(np.uint8), 'labels': rnd.randint(0, 10, size=len(idx)).tolist()}
            raw = pickle.dumps(data, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

#----------------------------------------------------------------------------

@click.command()
@click.option('--num',     help='Number of images', metavar='INT',          type=click.IntRange(min=5), default=10000, show_default=True)
@click.option('--repeats', help='Runs per measurement', metavar='INT',      type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--workers', help='DataLoader workers for batched reading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
def main(num, repeats, workers):
    """Time conversion and reading of a synthetic CIFAR-10-sized dataset."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, 'cifar-10-python.tar.gz')
        dest = os.path.join(tmp, 'cifar10-32x32.zip')
        write_synthetic_cifar10(source, num)
        t = median_seconds(lambda: dataset_conversion.convert_dataset(source, dest, progress=False), repeats)
        print(f'dataset_tool.py, CIFAR-10 tar.gz -> zip:      {num / t:8.0f} img/s  ({t:.2f} s for {num})')

        def read_in_process():
            dataset = ImageFolderDataset(dest, use_labels=True)
            for i in range(len(dataset)):
                dataset[i]
        t = median_seconds(read_in_process, repeats)
        print(f'ImageFolderDataset, zip, one process:        {num / t:8.0f} img/s')

        def read_batched():
            for _images, _labels in iterate_image_batches(dest, batch_size=256, num_workers=workers, use_labels=True):
                pass
        t = median_seconds(read_batched, repeats)
        print(f'iterate_image_batches, zip, {workers} workers, 256/batch: {num / t:8.0f} img/s')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

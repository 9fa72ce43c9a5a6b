"""Convert image collections into the datasets that train.py and fid.py read.

A dataset is an uncompressed zip (or a folder) of PNGs named `{idx // 1000:05d}/img{idx:08d}.png`
plus `dataset.json` holding `{"labels": [[file name, label], ...]}` or `{"labels": null}`; the
conversion itself is training/dataset_conversion.py.
"""

import os
import re

import click

from training import cli_checks
from training.dataset import DatasetError
from training.dataset_conversion import convert_dataset

#----------------------------------------------------------------------------

class Resolution(click.ParamType):
    name = 'WxH'

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        m = re.fullmatch(r'(\d+)[x,](\d+)', str(value).strip())
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            self.fail(f'"{value}" is not a size like 64x64', param, ctx)
        width, height = int(m.group(1)), int(m.group(2))
        try: # An RGB image and its resizing buffers, about 8 bytes per channel value.
            cli_checks.memory_fits(width * height * 3 * 8, f'One {width}x{height} image', 'give a smaller --resolution')
        except click.ClickException as e:
            self.fail(e.message, param, ctx)
        return width, height

@click.command(context_settings=dict(max_content_width=120))
@click.option('--source',     help='Image folder, zip of images, cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or UCI optdigits .tra/.csv(.gz)', metavar='PATH', type=str, required=True)
@click.option('--dest',       help='Output: .zip file (uncompressed) or new folder', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Convert only the first INT images', metavar='INT',                   type=click.IntRange(min=1))
@click.option('--transform',  help='Crop before resizing to --resolution', metavar='center-crop|center-crop-wide', type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--resolution', help='Output image size, e.g. 64x64', metavar='WxH',                       type=Resolution())

def main(source, dest, max_images, transform, resolution):
    """Convert images into a dataset for train.py and fid.py: PNGs plus class labels in dataset.json.

    Examples:

    \b
    # CIFAR-10 at 32x32 with class labels, from the python version of the archive
    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz \\
        --dest=datasets/cifar10-32x32.zip

    \b
    # FFHQ at 64x64 from the folder of 1024x1024 PNGs
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 \\
        --dest=datasets/ffhq-64x64.zip --resolution=64x64

    \b
    # MNIST with labels, 28x28 padded to 32x32 (train-labels-idx1-ubyte.gz must be next to it)
    python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz \\
        --dest=datasets/mnist-32x32.zip

    \b
    # UCI handwritten digits (8x8, 0..16) upsampled to 16x16: the bundled demo dataset
    python dataset_tool.py --source=bundled/digits/optdigits.csv.gz \\
        --dest=bundled/digits-16x16.zip --resolution=16x16

    \b
    # Non-square photos: crop the center square, then resize to 256x256; first 1000 images
    python dataset_tool.py --source=photos/ --dest=datasets/photos-256 --transform=center-crop \\
        --resolution=256x256 --max-images=1000

    Images in a folder or zip are read recursively in sorted order. Their labels come from a
    dataset.json next to them; without one, a folder whose images lie in several top-level
    subfolders (e.g. cat/, dog/, wild/) gets one class per subfolder, in sorted order. Output
    images must all be square and of one size; grayscale stays grayscale unless cropped (the
    crops give RGB). The result appears only when complete; a folder --dest must be new or empty.
    """
    try:
        if dest.lower().endswith('.zip'):
            cli_checks.output_file(dest, '--dest')
        elif not os.path.isdir(dest):
            cli_checks.output_folder(dest, '--dest')
        convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)
    except DatasetError as e:
        raise click.ClickException(str(e)) from None

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Frechet Inception Distance (FID) of a set of images against reference statistics.

Flags, reference files and numbers are those of NVIDIA EDM's fid.py; the distance itself is computed
without scipy.linalg.sqrtm (see training/frechet.py): exact, always real, and over 10x faster.
"""

import click

from torch_utils import distributed as dist
from training import cli_checks
from training import dataset
from training import feature_detectors
from training import frechet
from training import image_sources

#----------------------------------------------------------------------------

def open_images_or_fail(path, num=None, seed=0):
    try:
        images = image_sources.open_images(path, max_size=num, random_seed=seed)
    except dataset.DatasetError as e:
        raise click.ClickException(str(e))
    if num is not None and len(images) < num:
        raise click.ClickException(f'Found {len(images)} images in {path}, but --num={num}; generate more images or pass --num={len(images)}')
    if len(images) < 2:
        raise click.ClickException(f'Found {len(images)} image{"" if len(images) == 1 else "s"} in {path}; statistics need at least 2')
    return images

def load_detector_or_fail(detector_path, image_shape, device):
    try:
        return feature_detectors.load_feature_detector(detector_path, image_shape, device=device, verbose=(dist.get_rank() == 0))
    except feature_detectors.DetectorError as e:
        raise click.ClickException(str(e))

def image_statistics(images, detector, batch, workers, device):
    """(mu, sigma) of the detector's features of all `images`, over all ranks."""
    dist.print0(f'Calculating statistics for {len(images)} images...')
    try:
        moments = frechet.feature_moments(detector, images, batch_size=batch, num_workers=workers, device=device)
    except (dataset.DatasetError, feature_detectors.DetectorError) as e:
        raise click.ClickException(str(e))
    warning = frechet.few_images_warning(len(images), detector.feature_dim)
    if warning is not None and dist.get_rank() == 0:
        click.echo(warning, err=True)
    return moments.stats()

#----------------------------------------------------------------------------

@click.group()
def main():
    """Calculate Frechet Inception Distance (FID).

    Examples:

    \b
    # Generate 50000 images and save them as fid-tmp/*/*.png
    torchrun --standalone --nproc_per_node=1 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # Calculate FID
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # With torchrun, put -- before the script when passing --num: recent torchrun versions
    # otherwise take --num for an abbreviation of their own --numa-binding option.
    torchrun --standalone --nproc_per_node=2 -- fid.py calc --images=fid-tmp --num=10000 \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # FID of .npz sample files (uint8 NHWC under "samples"), offline with local files
    python fid.py calc --images=samples/ --ref=cifar10-32x32.npz --detector=inception-2015-12-05.pkl

    \b
    # Compute dataset reference statistics
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz

    Images are given to the detector at their stored size: EDM's Inception network resizes them
    to 299x299 itself. A --detector that does not resize must get images of its own input size.
    """

#----------------------------------------------------------------------------

detector_option = click.option('--detector', 'detector_path', help='Feature detector: pickled module or TorchScript file', metavar='PATH|URL',
    type=str, default=None, show_default='EDM\'s Inception-v3, or the bundled detector for references made with it')
batch_option = click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
workers_option = click.option('--workers', help='Data loader processes per rank', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
device_option = click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default=None)

@main.command()
@click.option('--images', 'image_path', help='Images: folder, zip, .npz sample file or folder of them', metavar='PATH|ZIP|NPZ', type=str, required=True)
@click.option('--ref', 'ref_path',      help='Dataset reference statistics', metavar='NPZ|URL',                                  type=str, required=True)
@click.option('--num', 'num_expected',  help='Number of images to use', metavar='INT',                                           type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed',                 help='Random seed for selecting the images', metavar='INT',                              type=int, default=0, show_default=True)
@batch_option
@detector_option
@workers_option
@device_option
def calc(image_path, ref_path, num_expected, seed, batch, detector_path, workers, device):
    """Calculate FID for a given set of images.

    Fewer images than --num is an error; of more, a random subset (picked by --seed) is used.
    """
    cli_checks.device_available(device)
    cli_checks.readable_npz(ref_path, '--ref', required_keys=['mu', 'sigma'])
    cli_checks.expect_kind(detector_path, '--detector', cli_checks.TORCH_MODULE_KINDS)
    device = dist.init(device)

    def load():
        try:
            ref_mu, ref_sigma, ref_detector = frechet.load_stats(ref_path, verbose=(dist.get_rank() == 0), with_detector=True)
        except frechet.StatsError as e:
            raise click.ClickException(str(e))
        images = open_images_or_fail(image_path, num_expected, seed)
        chosen = detector_path or feature_detectors.default_detector(ref_detector)
        dist.print0(f'Using detector {chosen}' + (' (the bundled one, which the reference statistics record)' if chosen != detector_path and ref_detector else ''))
        dist.download_first_on_rank0(chosen)
        detector = load_detector_or_fail(chosen, images.image_shape, device)
        try:
            frechet.check_detector(ref_detector, detector, ref_path)
        except frechet.StatsError as e:
            raise click.ClickException(str(e))
        if detector.feature_dim != ref_mu.shape[0]:
            raise click.ClickException(f'{ref_path} holds statistics of {ref_mu.shape[0]}-dimensional features, but detector '
                f'{chosen} gives {detector.feature_dim}; use the detector that made the reference')
        return ref_mu, ref_sigma, images, detector
    dist.print0('Loading reference statistics, images and detector...')
    dist.download_first_on_rank0(ref_path) # Downloads once per machine; then every rank reads in parallel.
    ref_mu, ref_sigma, images, detector = load()

    mu, sigma = image_statistics(images, detector, batch, workers, device)
    if dist.get_rank() == 0:
        dist.print0('Calculating FID...')
        try:
            fid = frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma)
        except ValueError as e: # NaN in the statistics: a broken reference file or detector.
            raise click.ClickException(f'Cannot compute FID: {e}')
        print(f'{fid:g}')
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'dataset_path', help='Dataset: folder, zip, .npz sample file or folder of them', metavar='PATH|ZIP|NPZ', type=str, required=True)
@click.option('--dest', 'dest_path',    help='Destination .npz file', metavar='NPZ',                                             type=str, required=True)
@batch_option
@detector_option
@workers_option
@device_option
def ref(dataset_path, dest_path, batch, detector_path, workers, device):
    """Calculate dataset reference statistics needed by 'calc'."""
    cli_checks.output_file(dest_path, '--dest')
    cli_checks.device_available(device)
    cli_checks.expect_kind(detector_path, '--detector', cli_checks.TORCH_MODULE_KINDS)
    device = dist.init(device)

    def load():
        images = open_images_or_fail(dataset_path)
        dist.print0(f'Using detector {detector_path or feature_detectors.INCEPTION_URL}')
        return images, load_detector_or_fail(detector_path or feature_detectors.INCEPTION_URL, images.image_shape, device)
    dist.print0(f'Loading images from "{dataset_path}" and the detector...')
    dist.download_first_on_rank0(detector_path or feature_detectors.INCEPTION_URL)
    images, detector = load()

    mu, sigma = image_statistics(images, detector, batch, workers, device)
    if dist.get_rank() == 0:
        dist.print0(f'Saving dataset reference statistics to "{dest_path}"...')
        frechet.save_stats(dest_path, mu, sigma, detector=dict(name=detector.source, sha256=detector.sha256))
    dist.barrier()
    dist.print0('Done.')
    dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

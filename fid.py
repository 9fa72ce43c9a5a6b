"""Frechet Inception Distance (FID) of a set of images against reference statistics.

Flags, reference files and numbers are those of NVIDIA EDM's fid.py; the distance itself is computed
without scipy.linalg.sqrtm (see training/evaluation/frechet.py): exact, always real, and over 10x faster.
"""

import click

import dnnlib
from torch_utils import distributed as dist
from training import cli_checks
from training import dataset
from training.evaluation import feature_detectors
from training.evaluation import fid_uncertainty
from training.evaluation import frechet
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

def reference_detector(detector_path, ref_detector, ref_path, image_shape, device):
    """(name, detector): the given detector or the default for this reference, checked against the one it records."""
    chosen = detector_path or feature_detectors.default_detector(ref_detector)
    dist.download_first_on_rank0(chosen)
    detector = load_detector_or_fail(chosen, image_shape, device)
    try:
        frechet.check_detector(ref_detector, detector, ref_path)
    except frechet.StatsError as e:
        raise click.ClickException(str(e))
    return chosen, detector

def image_features(images, detector, batch, workers, device):
    """FeatureSet of every image (rows in dataset order, over all ranks) with seeds from the file names or npz records."""
    import torch
    dist.print0(f'Calculating features of {len(images)} images...')
    features = torch.zeros([len(images), detector.feature_dim], dtype=torch.float32, device=device)
    indices = dataset.rank_batch_indices(len(images), batch, dist.get_rank(), dist.get_world_size())
    try:
        batches = dataset.iterate_image_batches(images, batch, dist.get_rank(), dist.get_world_size(), num_workers=workers)
        for rows, (batch_images, _labels) in zip(indices, batches):
            features[rows.to(device)] = detector(batch_images.to(device)).to(device)
    except (dataset.DatasetError, feature_detectors.DetectorError) as e:
        raise click.ClickException(str(e))
    dist.all_reduce_sum(features) # Each row is filled by exactly one rank.
    return fid_uncertainty.FeatureSet(features.cpu().numpy(), fid_uncertainty.seeds_of_images(images), source=images.name)

def features_or_images(path, detector_path, ref_path, ref_detector, ref_dim, batch, workers, device):
    """A FeatureSet from a features file as it is, or from images through the detector."""
    if fid_uncertainty.is_feature_file(path):
        try:
            return fid_uncertainty.load_features(path)
        except fid_uncertainty.UncertaintyError as e:
            raise click.ClickException(str(e))
    images = open_images_or_fail(path)
    chosen, detector = reference_detector(detector_path, ref_detector, ref_path, images.image_shape, device)
    if detector.feature_dim != ref_dim:
        raise click.ClickException(f'{ref_path} holds statistics of {ref_dim}-dimensional features, but detector {chosen} gives {detector.feature_dim}')
    return image_features(images, detector, batch, workers, device)

def write_json(path, result):
    import json
    with dnnlib.util.atomic_write(path, mode='w') as f:
        json.dump(result, f, indent=2)

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

def interval_options(fn):
    fn = click.option('--method', help='Square-root term per resample: exact, expansion (second order, fast), or auto (exact for D <= 256)',
        type=click.Choice(['auto', 'exact', 'expansion']), default='auto', show_default=True)(fn)
    fn = click.option('--resamples', help='Bootstrap resamples', metavar='INT', type=click.IntRange(min=10), default=fid_uncertainty.DEFAULT_RESAMPLES, show_default=True)(fn)
    fn = click.option('--blocks', help='Seed blocks the bootstrap draws', metavar='INT', type=click.IntRange(min=2), default=fid_uncertainty.DEFAULT_BLOCKS, show_default=True)(fn)
    return fn

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
@click.option('--ci',                   help='Also a 95% interval (block bootstrap) and FID-infinity', is_flag=True)
@click.option('--json', 'json_path',    help='Write FID (and with --ci its intervals) to this JSON file', metavar='PATH', type=str, default=None)
@click.option('--features', 'features_path', help='Also save the per-image features (with seeds) here', metavar='NPZ', type=str, default=None)
@click.option('--kid',                  help='Also KID with its standard error (needs a reference made with "ref --features")', is_flag=True)
@click.option('--kid_subset',           help='Images per KID subset', metavar='INT', type=click.IntRange(min=2), default=fid_uncertainty.KID_SUBSET_SIZE, show_default=True)
@interval_options
@batch_option
@detector_option
@workers_option
@device_option
def calc(image_path, ref_path, num_expected, seed, ci, json_path, features_path, kid, kid_subset, blocks, resamples, method, batch, detector_path, workers, device):
    """Calculate FID for a given set of images.

    Fewer images than --num is an error; of more, a random subset (picked by --seed) is used.
    --images may also be a features file from "fid.py features" (then no detector runs).

    \b
    # FID with a 95% interval and FID-infinity, one line to quote, also as JSON
    python fid.py calc --images=fid-tmp --ref=cifar10-32x32.npz --ci --json=fid.json --features=fid-tmp.npz
    python fid.py calc --images=fid-tmp.npz --ref=cifar10-32x32.npz --ci    # again from the saved features

    \b
    # KID (unbiased MMD^2, polynomial kernel) with its standard error, against a reference with features
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=cifar10-32x32-features.npz --features
    python fid.py calc --images=fid-tmp --ref=cifar10-32x32-features.npz --kid --json=fid.json
    """
    cli_checks.device_available(device)
    cli_checks.readable_npz(ref_path, '--ref', required_keys=['mu', 'sigma'])
    cli_checks.expect_kind(detector_path, '--detector', cli_checks.TORCH_MODULE_KINDS)
    if ci or kid or json_path or features_path or fid_uncertainty.is_feature_file(image_path):
        return calc_from_features(image_path, ref_path, num_expected, seed, ci, json_path, features_path, kid, kid_subset, blocks, resamples, method,
            batch, detector_path, workers, device)
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

def reference_features_for_kid(ref_path, ref_dim, image_path, num_images, subset_size):
    """The reference's per-image features, checked against the statistics, the images' number and the subset size."""
    try:
        ref_features = frechet.load_reference_features(ref_path, verbose=False)
        if ref_features.shape[1] != ref_dim:
            raise click.ClickException(f'{ref_path} holds {ref_features.shape[1]}-dimensional features but {ref_dim}-dimensional statistics; '
                f'rebuild it with "fid.py ref --features"')
        fid_uncertainty.check_kid_sizes(num_images, len(ref_features), subset_size, image_path)
    except (frechet.StatsError, fid_uncertainty.UncertaintyError) as e:
        raise click.ClickException(str(e))
    return ref_features

def calc_from_features(image_path, ref_path, num_expected, seed, ci, json_path, features_path, kid, kid_subset, blocks, resamples, method,
        batch, detector_path, workers, device):
    """calc through per-image features: --ci, --kid, --json, --features, or a features file as --images."""
    device = dist.init(device)
    try:
        ref_mu, ref_sigma, ref_detector = frechet.load_stats(ref_path, verbose=(dist.get_rank() == 0), with_detector=True)
    except frechet.StatsError as e:
        raise click.ClickException(str(e))
    ref_features = reference_features_for_kid(ref_path, ref_mu.shape[0], image_path, num_expected, kid_subset) if kid else None
    if fid_uncertainty.is_feature_file(image_path):
        feature_set = features_or_images(image_path, detector_path, ref_path, ref_detector, ref_mu.shape[0], batch, workers, device)
        if len(feature_set) < num_expected:
            raise click.ClickException(f'{image_path} holds features of {len(feature_set)} images, but --num={num_expected}; pass --num={len(feature_set)}')
    else:
        images = open_images_or_fail(image_path, num_expected, seed)
        chosen, detector = reference_detector(detector_path, ref_detector, ref_path, images.image_shape, device)
        if detector.feature_dim != ref_mu.shape[0]:
            raise click.ClickException(f'{ref_path} holds statistics of {ref_mu.shape[0]}-dimensional features, but detector '
                f'{chosen} gives {detector.feature_dim}; use the detector that made the reference')
        feature_set = image_features(images, detector, batch, workers, device)
        if features_path and dist.get_rank() == 0:
            fid_uncertainty.save_features(features_path, feature_set, detector=chosen)
    if dist.get_rank() == 0:
        try:
            ref = fid_uncertainty.ReferenceRoot(ref_mu, ref_sigma)
            fid_uncertainty.check_dims(feature_set, ref)
            if ci:
                result = fid_uncertainty.fid_with_interval(feature_set, ref, num_blocks=blocks, num_resamples=resamples, method=method)
            else:
                mu, sigma = fid_uncertainty.mean_and_covariance(feature_set)
                result = dict(fid=frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma), num_images=len(feature_set))
            if kid:
                result.update(fid_uncertainty.kid_with_error(feature_set, ref_features, subset_size=kid_subset))
        except (fid_uncertainty.UncertaintyError, ValueError) as e:
            raise click.ClickException(str(e))
        result.update(images=image_path, ref=ref_path)
        if json_path:
            write_json(json_path, result)
        if ci:
            print(fid_uncertainty.fid_line(result))
        if kid:
            print(fid_uncertainty.kid_line(result))
        print(f'{result["fid"]:g}')
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

@main.command()
@click.option('--images', 'image_path', help='Images: folder, zip or .npz sample file(s)', metavar='PATH|ZIP|NPZ', type=str, required=True)
@click.option('--dest', 'dest_path',    help='Destination features .npz (features [N, D], seeds [N])', metavar='NPZ', type=str, required=True)
@click.option('--num', 'num_expected',  help='Number of images to use  [default: all]', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--seed',                 help='Random seed for selecting the images', metavar='INT', type=int, default=0, show_default=True)
@batch_option
@detector_option
@workers_option
@device_option
def features(image_path, dest_path, num_expected, seed, batch, detector_path, workers, device):
    """Save per-image features with their seeds, for calc --ci and compare without rerunning the detector.

    Seeds come from file names as generate.py writes them (000123.png) or from the "seeds" record of
    generate.py --npz files; without them the file has no seeds and can only be compared --unpaired.

    \b
    python fid.py features --images=fid-tmp --dest=features/plain.npz --detector=inception-2015-12-05.pkl
    """
    device = dist.init(device)
    images = open_images_or_fail(image_path, num_expected, seed)
    chosen = detector_path or feature_detectors.INCEPTION_URL
    dist.download_first_on_rank0(chosen)
    detector = load_detector_or_fail(chosen, images.image_shape, device)
    feature_set = image_features(images, detector, batch, workers, device)
    if dist.get_rank() == 0:
        fid_uncertainty.save_features(dest_path, feature_set, detector=chosen)
        seeds = 'no seeds' if feature_set.seeds is None else f'seeds {feature_set.seeds.min()}-{feature_set.seeds.max()}'
        print(f'Saved {len(feature_set)} x {feature_set.dim} features ({seeds}) to "{dest_path}"')
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

@main.command()
@click.option('--a', 'path_a',          help='Baseline: images, folder, zip, .npz samples or features file', metavar='PATH', type=str, required=True)
@click.option('--b', 'path_b',          help='Compared setting, from the same seeds as --a', metavar='PATH', type=str, required=True)
@click.option('--ref', 'ref_path',      help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--unpaired',             help='Compare sets of different seeds as independent samples (wider interval)', is_flag=True)
@click.option('--json', 'json_path',    help='Also write the result to this JSON file', metavar='PATH', type=str, default=None)
@interval_options
@batch_option
@detector_option
@workers_option
@device_option
def compare(path_a, path_b, ref_path, unpaired, json_path, blocks, resamples, method, batch, detector_path, workers, device):
    """FID(A), FID(B) and FID(B) - FID(A) with a 95% interval from a paired bootstrap over seed blocks.

    \b
    # Plain sampler against epsilon scaling, both generated from --seeds=0-49999
    python fid.py compare --a=out-plain --b=out-eps --ref=cifar10-32x32.npz --json=compare.json
    python fid.py compare --a=plain.npz --b=eps.npz --ref=cifar10-32x32.npz    # saved features

    Sets of different seeds are refused unless --unpaired, which resamples them independently.
    """
    device = dist.init(device)
    try:
        ref_mu, ref_sigma, ref_detector = frechet.load_stats(ref_path, verbose=(dist.get_rank() == 0), with_detector=True)
    except frechet.StatsError as e:
        raise click.ClickException(str(e))
    set_a, set_b = [features_or_images(path, detector_path, ref_path, ref_detector, ref_mu.shape[0], batch, workers, device) for path in (path_a, path_b)]
    if dist.get_rank() == 0:
        try:
            ref = fid_uncertainty.ReferenceRoot(ref_mu, ref_sigma)
            for feature_set in (set_a, set_b):
                fid_uncertainty.check_dims(feature_set, ref)
            result = fid_uncertainty.paired_comparison(set_a, set_b, ref, num_blocks=blocks, num_resamples=resamples, method=method, unpaired=unpaired)
        except fid_uncertainty.UncertaintyError as e:
            raise click.ClickException(str(e))
        result.update(a=path_a, b=path_b, ref=ref_path)
        if json_path:
            write_json(json_path, result)
        print(fid_uncertainty.comparison_line(result))
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'dataset_path', help='Dataset: folder, zip, .npz sample file or folder of them', metavar='PATH|ZIP|NPZ', type=str, required=True)
@click.option('--dest', 'dest_path',    help='Destination .npz file', metavar='NPZ',                                             type=str, required=True)
@batch_option
@click.option('--detector', 'detector_path', help='Feature detector: pickled module or TorchScript file (recorded in --dest)', metavar='PATH|URL',
    type=str, default=None, show_default='EDM\'s Inception-v3')
@click.option('--features', 'with_features', help='Also store the per-image features, for calc --kid (N x D float32: 400 MB for 50k images)', is_flag=True)
@workers_option
@device_option
def ref(dataset_path, dest_path, batch, detector_path, with_features, workers, device):
    """Calculate dataset reference statistics needed by 'calc'.

    \b
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz --features   # for calc --kid
    """
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

    features = None
    if with_features:
        features = image_features(images, detector, batch, workers, device).features
        mu, sigma = fid_uncertainty.mean_and_covariance(fid_uncertainty.FeatureSet(features))
        warning = frechet.few_images_warning(len(images), detector.feature_dim)
        if warning is not None and dist.get_rank() == 0:
            click.echo(warning, err=True)
    else:
        mu, sigma = image_statistics(images, detector, batch, workers, device)
    if dist.get_rank() == 0:
        dist.print0(f'Saving dataset reference statistics{" and features" if with_features else ""} to "{dest_path}"...')
        frechet.save_stats(dest_path, mu, sigma, detector=dict(name=detector.source, sha256=detector.sha256), features=features)
    dist.barrier()
    dist.print0('Done.')
    dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

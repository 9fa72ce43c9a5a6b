"""SSCD copy-detection features, reproducibility (RP) score and memorization (M) score.

Commands and files follow the code of Zhang et al., "The Emergence of Reproducibility and
Consistency in Diffusion Models"; see training/evaluation/copy_detection.py for the definitions.
"""

import click
import numpy as np

import dnnlib
from torch_utils import distributed as dist
from training import cli_checks
from training.evaluation import copy_detection
from training import dataset
from training.evaluation import feature_detectors
from training import image_sources

#----------------------------------------------------------------------------

@click.group()
def main():
    """SSCD features and the scores of Zhang et al. (reproducibility, memorization).

    Examples:

    \b
    # SSCD features of two models' images, generated from the same seeds
    python sscd.py feature --images=out-model-a --features=sscd-a.npz
    python sscd.py feature --images=out-model-b --features=sscd-b.npz

    \b
    # Reproducibility: fraction of seeds whose two images are copies of each other
    python sscd.py rpscore --source=sscd-a.npz --target=sscd-b.npz

    \b
    # Memorization: features of the training set, then 1 - fraction of generated images
    # that copy some training image
    python sscd.py feature --images=datasets/cifar10-32x32.zip --features=sscd-train.npz
    python sscd.py mscore --source=sscd-a.npz --target=sscd-train.npz --t=0.6

    \b
    # Offline, with the model file downloaded elsewhere
    python sscd.py feature --images=out --features=sscd.npz --model=sscd_disc_large.torchscript.pt
    """

#----------------------------------------------------------------------------

@main.command()
@click.option('--images', 'image_path',      help='Images: folder, zip, .npz sample file or folder of them', metavar='PATH|ZIP|NPZ', type=str, required=True)
@click.option('--features', 'features_path', help='Where to save the features', metavar='NPZ',             type=str, required=True)
@click.option('--model', 'model_path',       help='SSCD TorchScript model', metavar='PATH|URL',            type=str, default=copy_detection.SSCD_URL, show_default='sscd_disc_large')
@click.option('--batch',                     help='Maximum batch size', metavar='INT',                     type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers',                   help='Data loader processes per rank', metavar='INT',         type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--device',                    help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default=None)
def feature(image_path, features_path, model_path, batch, workers, device):
    """Calculate SSCD features (L2-normalized, images resized to 320x320) of a set of images."""
    cli_checks.output_file(features_path, '--features')
    cli_checks.device_available(device)
    cli_checks.expect_kind(model_path, '--model', cli_checks.TORCH_MODULE_KINDS)
    device = dist.init(device)
    dist.download_first_on_rank0(model_path)
    try:
        images = image_sources.open_images(image_path)
        model = copy_detection.load_sscd_model(model_path, device=device, verbose=(dist.get_rank() == 0))
    except (dataset.DatasetError, feature_detectors.DetectorError) as e:
        raise click.ClickException(str(e))

    dist.print0(f'Calculating SSCD features of {len(images)} images...')
    try:
        features = copy_detection.sscd_features(model, images, batch_size=batch, num_workers=workers, device=device)
    except (dataset.DatasetError, feature_detectors.DetectorError) as e:
        raise click.ClickException(str(e))
    if dist.get_rank() == 0:
        dist.print0(f'Saving {features.shape[0]} x {features.shape[1]} features to "{features_path}"...')
        with dnnlib.util.atomic_write(features_path) as f:
            np.savez(f, features=features.cpu().numpy())
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

def load_features_or_fail(path, option):
    cli_checks.readable_npz(path, option, required_keys=['features'])
    try:
        return copy_detection.load_features(path)
    except ValueError as e:
        raise click.ClickException(str(e))

source_option = click.option('--source', 'source_path', help='SSCD features of the images to score', metavar='NPZ', type=str, required=True)
target_option = click.option('--target', 'target_path', help='SSCD features to compare with', metavar='NPZ',        type=str, required=True)
threshold_option = click.option('--t', 'threshold', help='Cosine similarity above which two images count as copies', metavar='FLOAT',
    type=click.FloatRange(min=-1, max=1), default=copy_detection.DEFAULT_THRESHOLD, show_default=True)

@main.command()
@source_option
@target_option
@threshold_option
def rpscore(source_path, target_path, threshold):
    """Reproducibility score: fraction of index-matched pairs with similarity > t."""
    cli_checks.finite(threshold, '--t')
    source, target = load_features_or_fail(source_path, '--source'), load_features_or_fail(target_path, '--target')
    if source.shape[0] != target.shape[0]:
        raise click.ClickException(f'{source_path} has {source.shape[0]} images and {target_path} {target.shape[0]}; the RP score pairs '
            f'image i with image i, so both must come from the same seeds')
    try:
        score = copy_detection.reproducibility_score(source, target, threshold)
    except ValueError as e:
        raise click.ClickException(str(e))
    print(f'RP score (pairs with cosine similarity > {threshold:g}, of {source.shape[0]}):')
    print(f'{score:g}')

@main.command()
@source_option
@target_option
@threshold_option
@click.option('--block', 'block_size', help='Rows per block of the similarity matrix', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
def mscore(source_path, target_path, threshold, block_size):
    """Memorization score: 1 - fraction of source images whose nearest target has similarity > t."""
    cli_checks.finite(threshold, '--t')
    source, target = load_features_or_fail(source_path, '--source'), load_features_or_fail(target_path, '--target')
    cli_checks.memory_fits(8 * min(block_size, source.shape[0]) * target.shape[0], f'A similarity block of {block_size} rows', 'give a smaller --block')
    try:
        score = copy_detection.memorization_score(source, target, threshold, block_size=block_size, progress=True)
    except ValueError as e:
        raise click.ClickException(str(e))
    print(f'M score (1 - fraction of {source.shape[0]} images with a target of cosine similarity > {threshold:g}, of {target.shape[0]}):')
    print(f'{score:g}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Train a small classifier on a labelled dataset and save it as a feature detector for fid.py.

For small or unusual images (handwritten digits, 16x16 toy data) where Inception-v3 features say
little, or offline where its weights cannot be fetched.
"""

import click
import numpy as np

from training.evaluation import classifier_detector
from training import cli_checks
from training.dataset import DatasetError, ImageFolderDataset

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--data',     help='Labelled dataset (zip or folder from dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--dest',     help='Where to save the TorchScript detector', metavar='PT',                       type=str, required=True)
@click.option('--epochs',   help='Training epochs', metavar='INT',                                             type=click.IntRange(min=1), default=30)
@click.option('--holdout',  help='Fraction of images held out to measure accuracy', metavar='FLOAT',           type=click.FloatRange(min=0, max=0.5), default=0.1)
@click.option('--seed',     help='Random seed', metavar='INT',                                                 type=int, default=0)
def main(data, dest, epochs, holdout, seed):
    """Train a classifier-based feature detector.

    Examples:

    \b
    # The detector of the bundled digits data (features for fid.py --detector)
    python train_detector.py --data=bundled/digits-16x16.zip --dest=bundled/digits-detector.pt
    python fid.py ref --data=bundled/digits-16x16.zip --dest=bundled/digits-16x16-ref.npz \\
        --detector=bundled/digits-detector.pt
    """
    cli_checks.output_file(dest, '--dest')
    try:
        dataset = ImageFolderDataset(data, use_labels=True)
    except DatasetError as e:
        raise click.ClickException(str(e))
    if not dataset.has_onehot_labels:
        raise click.ClickException(f'{data} has no class labels; the detector is a classifier and needs them')
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    labels = np.array([int(np.argmax(dataset.get_label(i))) for i in range(len(dataset))])

    order = np.random.RandomState(seed).permutation(len(images))
    num_holdout = int(round(len(images) * holdout))
    test, train = order[:num_holdout], order[num_holdout:]
    model, train_acc = classifier_detector.train_classifier_detector(images[train], labels[train], dataset.label_dim, epochs=epochs, seed=seed)
    if num_holdout > 0:
        print(f'Held-out accuracy: {classifier_detector.classifier_accuracy(model, images[test], labels[test]):.4f} '
            f'({num_holdout} images); training accuracy in the last epoch: {train_acc[-1]:.4f}')
    classifier_detector.export_detector(model, dest)
    print(f'Saved detector to "{dest}"')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

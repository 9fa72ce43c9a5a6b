"""Train the noise-conditional ADM classifier that discriminator guidance reads features from.

For a data set without a public classifier (the public `32x32_classifier.pt` covers CIFAR-10).
Same architecture and state-dict layout as that checkpoint: with class labels it learns them by
cross-entropy on VP-perturbed images; without labels it learns to tell which of four rotations an
image was given (self-supervised). One `classifier_{epoch}.pt` per epoch in --outdir.
"""

import click
import torch

from training import cli_checks
from torch_utils import distributed as dist
from training import dataset as dataset_lib
from training.guidance import guidance_training

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--data',     help='Training images: dataset zip/folder or .npz', metavar='ZIP|DIR|NPZ',            type=str, required=True)
@click.option('--outdir',   help='Where to write classifier_{epoch}.pt', metavar='DIR',                           type=str, required=True)
@click.option('--labels',   help='Learn the labels, or rotations (self-supervised)  [default: labels if any]', type=click.Choice(['classes', 'rotation']), default=None, show_default=False)
@click.option('--epochs',   help='Training epochs', metavar='INT',                                                type=click.IntRange(min=1), default=10)
@click.option('--batch',    help='Batch size', metavar='INT',                                                     type=click.IntRange(min=1), default=128)
@click.option('--lr',       help='Learning rate', metavar='FLOAT',                                                type=click.FloatRange(min=0, min_open=True), default=3e-4)
@click.option('--width',    help='Base width (128 = the public classifier)', metavar='INT',                       type=click.IntRange(min=1), default=128)
@click.option('--depth',    help='Residual blocks per level  [default: 4 at 32/64 px, else 2]', metavar='INT',    type=click.IntRange(min=1), default=None, show_default=False)
@click.option('--max_size', help='Use at most this many images', metavar='INT',                                   type=click.IntRange(min=1), default=None)
@click.option('--seed',     help='Random seed', metavar='INT',                                                    type=int, default=0)
@click.option('--device',   help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu',            type=click.Choice(['cuda', 'cpu']), default=None, show_default=False)
def main(data, outdir, labels, epochs, batch, lr, width, depth, max_size, seed, device):
    """Train a noise-conditional feature classifier for discriminator guidance.

    Examples:

    \b
    # A labelled data set (dataset.json labels)
    python train_classifier.py --data=datasets/my-32x32.zip --outdir=cls --epochs=30

    \b
    # No labels: the rotation task
    python train_classifier.py --data=datasets/faces-64x64.zip --outdir=cls --labels=rotation
    """
    cli_checks.output_folder(outdir)
    cli_checks.device_available(device)
    if dist.launched_world_size() > 1: # Each rank would train its own copy on the same device and overwrite the same files.
        raise click.ClickException(f'train_classifier.py trains in one process on one device; start it with python, not torchrun with '
            f'{dist.launched_world_size()} processes')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        if labels is None:
            has_labels = guidance_training.has_class_labels(data)
            labels = 'classes' if has_labels else 'rotation'
            print(f'{data} has {"class labels" if has_labels else "no class labels"}: learning {labels}')
        images, class_labels = guidance_training.load_image_set(data, need_labels=(labels == 'classes'), max_size=max_size)
    except dataset_lib.DatasetError as e:
        raise click.ClickException(str(e))
    try:
        _net, history = guidance_training.train_classifier(images, outdir, class_labels, epochs=epochs, batch_size=batch, lr=lr,
            model_channels=width, num_res_blocks=depth, seed=seed, device=device)
    except ValueError as e:
        raise click.ClickException(str(e))
    last = history[-1]
    print(f'Epoch {last["epoch"]}: loss {last["loss"]:.4f}, accuracy {last["accuracy"]:.4f}; saved to "{outdir}"')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

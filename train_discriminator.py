"""Train the discriminator of discriminator guidance (Kim et al., ICML 2023) for one generator.

Real images (a dataset zip or folder from dataset_tool.py, or an .npz with `samples` or `arr_0`)
against the generator's samples (generate.py's PNG folder or its --npz files), both diffused to importance-
sampled VP times and seen through a frozen ADM classifier; one `discriminator_{epoch}.pt` per
epoch in --outdir, loadable by generate.py --discriminator_ckpt and by DG's own code.
"""

import click
import torch

from training import cli_checks
from torch_utils import distributed as dist
from training import dataset as dataset_lib
from training.guidance import discriminator_guidance as dg
from training.guidance import guidance_training

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--real',                       help='Real images: dataset zip/folder or .npz', metavar='ZIP|DIR|NPZ',       type=str, required=True)
@click.option('--fake',                       help='Generated images: PNG folder or .npz file(s)', metavar='DIR|NPZ',      type=str, required=True)
@click.option('--outdir',                     help='Where to write discriminator_{epoch}.pt', metavar='DIR',               type=str, required=True)
@click.option('--pretrained_classifier_ckpt', help='ADM feature classifier (32x32_classifier.pt)', metavar='PT',            type=str, required=True)
@click.option('--cond',                       help='Class-conditional discriminator (needs labels on both sides)', metavar='0|1', type=click.IntRange(min=0, max=1), default=0)
@click.option('--num_data',                   help='Use at most this many real and this many generated images', metavar='INT', type=click.IntRange(min=1), default=50000)
@click.option('--epochs',                     help='Training epochs', metavar='INT',                                        type=click.IntRange(min=1), default=50)
@click.option('--batch',                      help='Batch size', metavar='INT',                                             type=click.IntRange(min=1), default=128)
@click.option('--lr',                         help='Learning rate', metavar='FLOAT',                                        type=click.FloatRange(min=0, min_open=True), default=3e-4)
@click.option('--width',                      help='Discriminator base width (128 = DG\'s)', metavar='INT',                  type=click.IntRange(min=1), default=128)
@click.option('--depth',                      help='Residual blocks (2 = DG\'s)', metavar='INT',                             type=click.IntRange(min=1), default=2)
@click.option('--seed',                       help='Random seed', metavar='INT',                                            type=int, default=0)
@click.option('--device',                     help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu',    type=click.Choice(['cuda', 'cpu']), default=None, show_default=False)
def main(real, fake, outdir, pretrained_classifier_ckpt, cond, num_data, epochs, batch, lr, width, depth, seed, device):
    """Train a discriminator for discriminator guidance.

    Examples:

    \b
    # CIFAR-10 unconditional: 50k samples of the generator, then 50 epochs (DG's recipe)
    torchrun --standalone --nproc_per_node=2 generate.py --network=edm-cifar10-32x32-uncond-vp.pkl \\
        --outdir=samples-uncond --seeds=0-49999 --npz
    python train_discriminator.py --real=datasets/cifar10-32x32.zip --fake=samples-uncond \\
        --pretrained_classifier_ckpt=32x32_classifier.pt --outdir=disc-uncond

    \b
    # Class-conditional: labels from dataset.json and from the samples' "label" arrays
    python train_discriminator.py --real=datasets/cifar10-32x32.zip --fake=samples-cond --cond=1 \\
        --pretrained_classifier_ckpt=32x32_classifier.pt --outdir=disc-cond
    """
    cli_checks.output_folder(outdir)
    cli_checks.device_available(device)
    cli_checks.expect_kind(pretrained_classifier_ckpt, '--pretrained_classifier_ckpt', cli_checks.STATE_DICT_KINDS)
    if dist.launched_world_size() > 1: # Each rank would train its own copy on the same device and overwrite the same files.
        raise click.ClickException(f'train_discriminator.py trains in one process on one device; start it with python, not torchrun with '
            f'{dist.launched_world_size()} processes')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        real_images, real_labels = guidance_training.load_image_set(real, need_labels=bool(cond), max_size=num_data)
        fake_images, fake_labels = guidance_training.load_image_set(fake, need_labels=bool(cond), max_size=num_data)
    except dataset_lib.DatasetError as e:
        hint = '; --cond=1 needs labels: dataset.json for a dataset, "label" arrays in generate.py --npz output' if cond and 'labels' in str(e) else ''
        raise click.ClickException(str(e) + hint)
    if real_images.shape[1:] != fake_images.shape[1:]:
        raise click.ClickException(f'Real images are {list(real_images.shape[1:])} (CHW), generated ones {list(fake_images.shape[1:])}; they must match')
    try:
        classifier = dg.load_classifier(pretrained_classifier_ckpt, real_images.shape[-1], real_images.shape[1])
    except dg.GuidanceCheckpointError as e:
        raise click.ClickException(str(e))
    print(f'Training on {len(real_images)} real and {len(fake_images)} generated images, features '
        f'{classifier.feature_channels}x{classifier.feature_resolution}x{classifier.feature_resolution}, on {device}')
    if max(len(real_images), len(fake_images)) > 1.5 * min(len(real_images), len(fake_images)):
        click.echo(f'Warning: {len(real_images)} real vs {len(fake_images)} generated images; the classes are weighted to count equally, '
            f'and balanced accuracy (not plain accuracy) says how well they are told apart', err=True)
    try:
        _disc, history = guidance_training.train_discriminator(classifier, real_images, fake_images, outdir, real_labels, fake_labels,
            cond=bool(cond), epochs=epochs, batch_size=batch, lr=lr, model_channels=width, num_res_blocks=depth, seed=seed, device=device)
    except ValueError as e:
        raise click.ClickException(str(e))
    last = history[-1]
    print(f'Epoch {last["epoch"]}: loss {last["loss"]:.4f}, balanced accuracy {last["balanced_accuracy"]:.4f} '
        f'(accuracy {last["accuracy"]:.4f}); saved to "{outdir}"')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

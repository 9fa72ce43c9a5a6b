"""Memorization-to-generalization study in one command: EDM models trained on nested subsets of the
bundled digits, scored against their training images and the optimal denoiser of those images.

See training/studies/generalization_study.py for what is measured and docs/generalization.md for the method.
"""

import signal
import sys
import time

import click
import torch

from training import bundled
from training import cli_checks
from training.studies import generalization_study

#----------------------------------------------------------------------------

POSITIVE_INTS = cli_checks.NumberList(int, lambda v: v >= 1, 'integers', 'at least one positive integer')

# name: (default, --quick value)
SIZES = dict(sizes=([16, 64, 256, 1024], [8, 32]), widths=([8, 16], [4, 8]), kimg=(15.0, 0.4), batch=(32, 16), seeds=(256, 32), steps=(18, 8))

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--outdir',      help='Where to write the results (and the models, samples and subsets)', metavar='DIR', type=str, required=True)
@click.option('--data',        help='Images to draw the subsets from  [default: the bundled digits]', metavar='ZIP|DIR', type=str, show_default=False)
@click.option('--quick',       help='Tiny settings for a test run (about 2 minutes); flags given as well win', is_flag=True)
@click.option('--sizes',       help=f'Training-set sizes, nested  [default: {SIZES["sizes"][0]}]', metavar='LIST', type=POSITIVE_INTS, show_default=False)
@click.option('--widths',      help=f'Network widths (--cbase of train.py)  [default: {SIZES["widths"][0]}]', metavar='LIST', type=POSITIVE_INTS, show_default=False)
@click.option('--kimg',        help=f'Training length per model, thousands of images  [default: {SIZES["kimg"][0]:g}]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), show_default=False)
@click.option('--batch',       help=f'Training batch size  [default: {SIZES["batch"][0]}]', metavar='INT', type=click.IntRange(min=1), show_default=False)
@click.option('--lr',          help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=2e-3)
@click.option('--seeds',       'num_seeds', help=f'Seeds 0..N-1 to sample  [default: {SIZES["seeds"][0]}]', metavar='INT', type=click.IntRange(min=1), show_default=False)
@click.option('--steps',       'num_steps', help=f'Heun sampling steps  [default: {SIZES["steps"][0]}]', metavar='INT', type=click.IntRange(min=2), show_default=False)
@click.option('--split_seed',  help='Seed of the permutation that makes the nested subsets', metavar='INT', type=click.IntRange(min=0), default=0)
@click.option('--train_seed',  help='Seed of every training run', metavar='INT', type=click.IntRange(min=0), default=0)
@click.option('--jobs',        help='Trainings at once (each with OMP_NUM_THREADS=1 unless set)', metavar='INT', type=click.IntRange(min=1), default=2)
@click.option('--sscd',        'sscd_model', help='Judge copies by this SSCD model (sscd.py) instead of pixels', metavar='PATH|URL', type=str)
@click.option('--cres',        help='Channels per resolution of the networks (train.py --cres)', metavar='LIST', type=POSITIVE_INTS, default='1,2,2')
@click.option('--device',      help='Device  [default: cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default='cpu', show_default=False)
def main(outdir, data, quick, jobs, device, lr, split_seed, train_seed, sscd_model, cres, **sizes):
    """Train small EDM models on nested subsets of a data set and measure memorization (M score),
    agreement with the optimal denoiser (RP score), reproducibility across widths and Jacobian ranks.

    Writes to --outdir: table.csv, summary.md, scores.png, jacobian.png and study.json, and keeps
    models/ (train.py runs with train.log), images/ (samples) and data/ (subset zips). Run the same
    command again to continue a killed study; finished models and measurements are kept.

    Examples:

    \b
    # The default study on the bundled digits (about 45 minutes on 2 CPU cores)
    OMP_NUM_THREADS=1 python generalization_study.py --outdir=results/generalization

    \b
    # The same in two minutes, tiny and not meant to show anything
    python generalization_study.py --outdir=out/generalization-quick --quick

    \b
    # Longer training, three widths
    python generalization_study.py --outdir=out/gen-long --kimg=200 --widths=8,16,32
    """
    start = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1)) # Unwinds through the study, which then stops its trainings.
    values = {name: (given if given is not None else SIZES[key][1 if quick else 0])
        for name, given, key in [(n, sizes[n], {'num_seeds': 'seeds', 'num_steps': 'steps'}.get(n, n)) for n in sizes]}
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device=cuda, but no CUDA device is available')
    try:
        study = generalization_study.Study(data or bundled.DATA, outdir, values['sizes'], values['widths'], values['kimg'], values['batch'], lr,
            values['num_seeds'], values['num_steps'], split_seed=split_seed, train_seed=train_seed, jobs=jobs, device=device,
            sscd_model=sscd_model, cres=cres)
        study.run()
    except generalization_study.StudyError as e:
        raise click.ClickException(str(e))
    print()
    print(generalization_study.summary_markdown(study.results, study.table_rows()))
    print(f'Wrote results to "{outdir}" in {time.time() - start:.0f} s')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

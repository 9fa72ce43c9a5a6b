"""Training speed of EDM and CDM (consistency regularization) on the same configuration.

Runs train.py as a subprocess once per preconditioning (alternating, --repeats times, so that a
change in machine load hits both alike), with the same data, network, batch and seed, and reads
the seconds per kimg that the training loop itself logs in stats.jsonl. The first tick is left
out: it is a single iteration and pays for warm-up. Prints kimg/s per method and the ratio of the
step times, cdm / edm. CDM's extra cost is the consistency term: (martingale_steps - 1) network
evaluations without gradient on two trajectories, plus one with gradient on both.

    python benchmarks/training_speed.py --data=bundled/digits-16x16.zip --cbase=16 --cres=1,2,2 --batch=32 --kimg=0.32 --repeats=2
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------

def timed_training_run(precond, data, common_args, workdir):
    """Median sec/kimg over the ticks after the first of one train.py run."""
    outdir = os.path.join(workdir, precond)
    args = [sys.executable, os.path.join(REPO, 'train.py'), f'--outdir={outdir}', '--nosubdir', f'--data={data}', f'--precond={precond}', *common_args]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise click.ClickException(f'train.py --precond={precond} failed: {lines[-1] if lines else "no output"}')
    with open(os.path.join(outdir, 'stats.jsonl')) as f:
        ticks = [json.loads(line) for line in f]
    timed = [tick['Timing/sec_per_kimg']['mean'] for tick in ticks[1:]]
    if not timed:
        raise click.ClickException('Only one tick was logged; give a larger --kimg or a smaller --tick')
    return statistics.median(timed)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True))
@click.option('--data',              help='Dataset', metavar='ZIP|DIR|PT',                type=str, default=os.path.join(REPO, 'bundled', 'digits-16x16.zip'))
@click.option('--cbase',             help='Channel multiplier', metavar='INT',            type=click.IntRange(min=1), default=16)
@click.option('--cres',              help='Channels per resolution', metavar='LIST',      type=str, default='1,2,2')
@click.option('--batch',             help='Batch size', metavar='INT',                    type=click.IntRange(min=1), default=32)
@click.option('--kimg',              help='Training length of each run', metavar='KIMG',  type=click.FloatRange(min=0, min_open=True), default=0.32)
@click.option('--tick',              help='Timing interval', metavar='KIMG',              type=click.FloatRange(min=0, min_open=True), default=0.064)
@click.option('--martingale_steps',  help='CDM: noise levels per trajectory', metavar='INT', type=click.IntRange(min=2), default=6)
@click.option('--repeats',           help='Runs per method', metavar='INT',               type=click.IntRange(min=1), default=2)
@click.option('--device',            help='Device', metavar='cpu|cuda',                   type=click.Choice(['cpu', 'cuda']), default='cpu')
def main(data, cbase, cres, batch, kimg, tick, martingale_steps, repeats, device):
    """Print kimg/s of train.py with --precond=edm and --precond=cdm and their step-time ratio."""
    common_args = [f'--cbase={cbase}', f'--cres={cres}', f'--batch={batch}', f'--duration={kimg / 1000}', f'--tick={tick}',
        '--snap=100000', '--dump=100000', '--augment=0', '--dropout=0', '--lr_rampup=0', '--workers=0', f'--device={device}', '--seed=0',
        f'--martingale_steps={martingale_steps}']
    times = dict(edm=[], cdm=[])
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(repeats):
            for precond in times:
                times[precond].append(timed_training_run(precond, data, common_args, os.path.join(workdir, str(repeat))))
                print(f'run {repeat + 1}/{repeats} {precond}: {1 / times[precond][-1]:.4g} kimg/s', flush=True)
    edm, cdm = (statistics.median(times[precond]) for precond in ('edm', 'cdm'))
    print(f'{os.path.basename(data)}, cbase={cbase}, cres={cres}, batch={batch}, martingale_steps={martingale_steps}, {device}, median of {repeats}:')
    print(f'  edm: {1 / edm:8.4g} kimg/s  ({edm * batch / 1000:.4g} s/step)')
    print(f'  cdm: {1 / cdm:8.4g} kimg/s  ({cdm * batch / 1000:.4g} s/step)')
    print(f'  cdm/edm step time: {cdm / edm:.2f}x')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

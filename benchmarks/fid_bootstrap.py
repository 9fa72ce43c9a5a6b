"""Time of a paired FID comparison with a bootstrap interval at the sizes users run, and its checks.

Random features (a random linear map of Gaussian noise, so the covariance has a spread of
eigenvalues as Inception features do); B is A scaled by 1.01 and shifted, so both the mean and the covariance terms differ.
Prints the time of 200 resamples of a 50k x 2048 paired comparison (everything after
the features exist: block moments, the reference square root, both FIDs and the resamples).

    python benchmarks/fid_bootstrap.py                          # 50k x 2048, 200 resamples, expansion (second-order)
    OMP_NUM_THREADS=2 python benchmarks/fid_bootstrap.py        # the same with 2 BLAS threads, as the README's figure
    python benchmarks/fid_bootstrap.py --validate               # expansion vs exact at 10k x 256 and 10k x 512
    python benchmarks/fid_bootstrap.py --stability --num=20000  # endpoint spread against the number of resamples
"""

import os
import sys
import time

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.evaluation import fid_uncertainty as fu

#----------------------------------------------------------------------------

def random_problem(num, dim, shift=0.02, seed=0):
    rnd = np.random.default_rng(seed)
    mixing = (rnd.standard_normal([dim, dim]) / np.sqrt(dim) * np.exp(rnd.uniform(-2, 0.5, size=dim))).astype(np.float32)
    ref_mixing = mixing * np.float32(1.05)
    ref = fu.ReferenceRoot(np.zeros(dim), ref_mixing.T.astype(np.float64) @ ref_mixing)
    features = np.empty([num, dim], dtype=np.float32)
    for start in range(0, num, 8192): # Chunks keep the float64 noise small.
        rows = min(8192, num - start)
        features[start:start + rows] = rnd.standard_normal([rows, dim], dtype=np.float32) @ mixing + np.float32(0.05)
    seeds = np.arange(num)
    return fu.FeatureSet(features, seeds, 'A'), fu.FeatureSet(features * np.float32(1.01) + np.float32(shift), seeds, 'B'), ref

def blas_threads():
    """The thread count that numpy's BLAS was started with (OpenBLAS and MKL read these at import)."""
    for name in ('OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS'):
        if os.environ.get(name):
            return f'{os.environ[name]} ({name})'
    return f'{os.cpu_count()} (the default: one per CPU)'

def timed_comparison(num, dim, resamples, blocks, method):
    set_a, set_b, ref_moments = random_problem(num, dim)
    start = time.time()
    ref = fu.ReferenceRoot(ref_moments.mu, ref_moments.sigma)
    result = fu.paired_comparison(set_a, set_b, ref, num_blocks=blocks, num_resamples=resamples, method=method)
    return time.time() - start, result

#----------------------------------------------------------------------------

@click.command()
@click.option('--num',        help='Images per set', metavar='INT',         type=click.IntRange(min=4), default=50000, show_default=True)
@click.option('--dim',        help='Feature dimension', metavar='INT',      type=click.IntRange(min=2), default=2048, show_default=True)
@click.option('--resamples',  help='Bootstrap resamples', metavar='INT',    type=click.IntRange(min=2), default=200, show_default=True)
@click.option('--blocks',     help='Seed blocks', metavar='INT',            type=click.IntRange(min=1), default=100, show_default=True)
@click.option('--method',     help='Square-root term', type=click.Choice(['auto', 'exact', 'expansion']), default='expansion', show_default=True)
@click.option('--validate',   help='Compare the expansion and exact intervals at 10k x 256 and 10k x 512', is_flag=True)
@click.option('--stability',  help='Endpoint spread over repeated bootstraps against the number of resamples', is_flag=True)
def main(num, dim, resamples, blocks, method, validate, stability):
    """Time (and check) the bootstrap of a paired FID comparison."""
    if validate:
        for d in (256, 512):
            t_exact, exact = timed_comparison(10000, d, resamples, blocks, 'exact')
            t_lin, lin = timed_comparison(10000, d, resamples, blocks, 'expansion')
            print(f'10000 x {d}: exact {t_exact:.1f} s, CI [{exact["ci"][0]:.5f}, {exact["ci"][1]:.5f}], A CI [{exact["ci_a"][0]:.4f}, {exact["ci_a"][1]:.4f}]')
            print(f'{"":13s}expansion  {t_lin:.1f} s, CI [{lin["ci"][0]:.5f}, {lin["ci"][1]:.5f}], A CI [{lin["ci_a"][0]:.4f}, {lin["ci_a"][1]:.4f}]')
            width = exact['ci'][1] - exact['ci'][0]
            print(f'{"":13s}endpoints differ by {abs(lin["ci"][0] - exact["ci"][0]) / width:.1%} and {abs(lin["ci"][1] - exact["ci"][1]) / width:.1%} of the exact width')
        return
    if stability:
        set_a, set_b, ref = random_problem(num, dim)
        stats_a = fu.block_statistics(set_a.sorted_by_seed(), ref, blocks, method)
        stats_b = fu.block_statistics(set_b.sorted_by_seed(), ref, blocks, method)
        fd_a, fd_b = fu.ResampledFrechet(stats_a, ref), fu.ResampledFrechet(stats_b, ref)
        diff = fd_b.fid - fd_a.fid
        print(f'{num} x {dim}, {blocks} blocks: FID(B) - FID(A) = {diff:.5f}; spread (std) of the 95% endpoints over 20 bootstraps:')
        for count in (50, 100, 200, 500, 1000, 2000):
            ends = []
            for repeat in range(20):
                weights = fu.resample_weights(blocks, count, seed=1000 + repeat)
                ends.append(fu.centered_interval(diff, fd_b(weights)[0] - fd_a(weights)[0]))
            ends = np.array(ends)
            width = np.mean(ends[:, 1] - ends[:, 0])
            print(f'  {count:5d} resamples: lower {ends[:, 0].std():.5f}, upper {ends[:, 1].std():.5f} = {ends[:, 0].std() / width:.1%} / {ends[:, 1].std() / width:.1%} of the width {width:.5f}')
        return
    load_before = os.getloadavg()[0]
    seconds, result = timed_comparison(num, dim, resamples, blocks, method)
    print(fu.comparison_line(result))
    print(f'{num} x {dim}, {resamples} resamples, {blocks} blocks, {result["method"]}: {seconds:.1f} s with {blas_threads()} BLAS threads '
        f'on {os.cpu_count()} CPUs, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

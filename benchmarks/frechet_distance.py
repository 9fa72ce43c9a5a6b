"""Speed and agreement of the Frechet distance against the textbook scipy.linalg.sqrtm formula.

Statistics are of random features (a random linear map of Gaussian noise, so the covariance has a
spread of eigenvalues like Inception features do), d=2048 as for FID. Also times the rank-deficient
case (fewer images than dimensions), where sqrtm tends to return complex numbers or NaN.

    python benchmarks/frechet_distance.py --dim=2048 --repeats=3
"""

import os
import sys
import warnings

import click
import numpy as np
import scipy.linalg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import timed
from training.evaluation import frechet

#----------------------------------------------------------------------------

def textbook_frechet_distance(mu1, sigma1, mu2, sigma2):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    value = np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * root)
    return value

def random_stats(rnd, dim, num):
    mixing = rnd.standard_normal([dim, dim]) / np.sqrt(dim) * np.exp(rnd.uniform(-3, 1, size=dim))
    features = rnd.standard_normal([num, dim]) @ mixing + rnd.standard_normal(dim)
    return features.mean(axis=0), np.cov(features, rowvar=False)

#----------------------------------------------------------------------------

@click.command()
@click.option('--dim',            help='Feature dimension', metavar='INT',                  type=click.IntRange(min=2), default=2048, show_default=True)
@click.option('--repeats',        help='Runs of the fast route', metavar='INT',             type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--sqrtm-repeats',  help='Runs of the sqrtm route (slow)', metavar='INT',     type=click.IntRange(min=1), default=1, show_default=True)
def main(dim, repeats, sqrtm_repeats):
    """Time the symmetric eigenvalue route and scipy.linalg.sqrtm on the same statistics."""
    rnd = np.random.default_rng(0)
    cases = {
        'full rank (5000 images each)': (random_stats(rnd, dim, 5000), random_stats(rnd, dim, 5000)),
        'rank-deficient (1000 vs 500 images)': (random_stats(rnd, dim, 1000), random_stats(rnd, dim, 500)),
    }
    for name, ((mu1, sigma1), (mu2, sigma2)) in cases.items():
        t_fast, fast = timed(lambda: frechet.frechet_distance(mu1, sigma1, mu2, sigma2), repeats)
        t_sqrtm, textbook = timed(lambda: textbook_frechet_distance(mu1, sigma1, mu2, sigma2), sqrtm_repeats)
        print(f'd={dim}, {name}:')
        print(f'  scipy.linalg.sqrtm:        {t_sqrtm:8.2f} s   FID {textbook}')
        print(f'  symmetric eigenvalues:     {t_fast:8.2f} s   FID {fast!r}')
        print(f'  speed-up {t_sqrtm / t_fast:.1f}x, relative difference {abs(fast - np.real(textbook)) / abs(fast):.1e}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

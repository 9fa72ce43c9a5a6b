"""Speed and memory of the M score: blocked matrix products vs. the original's broadcasting.

The original compares 128 source descriptors at a time with all targets by forming a
(128 x N_target x D) product tensor and summing it. Here blocks of the similarity matrix come from
float32 matrix products; only rows within float32 rounding of the threshold are redone in float64.
Descriptors are random unit vectors, a quarter of the sources made near-copies of targets.

    python benchmarks/mscore.py --num=4096 --dim=512
    python benchmarks/mscore.py --num=100000 --dim=512 --skip-naive     # 100k x 100k, blocked only
"""

import os
import resource
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.evaluation import copy_detection

#----------------------------------------------------------------------------

def naive_mscore(source, target, threshold, batch=128):
    source, target = source[:, None, :], target[None, :, :]
    matched = 0
    for start in range(0, source.shape[0], batch):
        similarity = (source[start:start + batch] * target).sum(axis=2).max(axis=1)
        matched += (similarity > threshold).sum()
    return 1 - matched / source.shape[0]

def random_descriptors(num, dim, seed):
    rnd = np.random.default_rng(seed)
    x = rnd.standard_normal([num, dim], dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

#----------------------------------------------------------------------------

@click.command()
@click.option('--num',        help='Source and target descriptors each', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--dim',        help='Descriptor dimension', metavar='INT',              type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--block',      help='Block size', metavar='INT',                        type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--skip-naive', help='Do not time the broadcasting version', is_flag=True)
def main(num, dim, block, skip_naive):
    """Time the blocked and the broadcasting M score and report peak memory."""
    target = random_descriptors(num, dim, seed=0)
    source = random_descriptors(num, dim, seed=1)
    copies = num // 4
    source[:copies] = target[:copies] + 0.03 * random_descriptors(copies, dim, seed=2)
    source /= np.linalg.norm(source, axis=1, keepdims=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    blocked = copy_detection.memorization_score(source, target, 0.6, block_size=block)
    t_blocked = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full_gib = num * num * 4 / 2 ** 30
    print(f'{num} x {num} descriptors of dimension {dim}, {torch.get_num_threads()} threads:')
    print(f'  blocked matrix products: {t_blocked:8.2f} s   M score {blocked:.6f}   peak RSS {rss_after:.0f} MiB '
        f'(+{rss_after - rss_before:.0f}; the full float32 similarity matrix would be {full_gib:.1f} GiB)')
    if not skip_naive:
        t0 = time.perf_counter()
        naive = naive_mscore(source, target, 0.6)
        t_naive = time.perf_counter() - t0
        print(f'  broadcasting (original): {t_naive:8.2f} s   M score {naive:.6f}')
        print(f'  speed-up {t_naive / t_blocked:.1f}x')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

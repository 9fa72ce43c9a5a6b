"""Wall-clock medians for the benchmark scripts."""

import time

import numpy as np

#----------------------------------------------------------------------------

def timed(fn, repeats, warmup=0):
    """(median seconds of `repeats` calls of fn, the last call's result); `warmup` calls first, untimed."""
    for _ in range(warmup):
        fn()
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), value

def median_seconds(fn, repeats, warmup=0):
    return timed(fn, repeats, warmup)[0]

#----------------------------------------------------------------------------

"""Running statistics reported from anywhere in the training code and gathered once per tick.

`report('Loss/loss', tensor)` adds the tensor's elements to the running count, sum and sum of
squares of that name (cheaply, on the tensor's own device). A `Collector` then sums those moments
over all ranks at `update()` and exposes mean / std / count per name for logging to stats.jsonl.
"""

import re

import numpy as np
import torch

from . import distributed as dist

#----------------------------------------------------------------------------

_num_moments = 3                # count, sum, sum of squares
_reduce_dtype = torch.float64   # Accumulate in double so long ticks lose no precision.
_counters = {}                  # name -> {device: tensor of moments}

#----------------------------------------------------------------------------

def report(name, value):
    """Accumulate the elements of `value` under `name`; returns `value` unchanged."""
    per_device = _counters.setdefault(name, {}) # Even an empty report makes the name known to every rank.
    values = torch.as_tensor(value)
    if values.numel() > 0:
        values = values.detach().flatten().to(_reduce_dtype)
        count, total, total_of_squares = torch.ones_like(values).sum(), values.sum(), values.square().sum()
        moments = torch.stack([count, total, total_of_squares])
        per_device.setdefault(moments.device, torch.zeros_like(moments)).add_(moments)
    return value

def report0(name, value):
    """Like report(), but only rank 0's values count (others report nothing)."""
    report(name, value if dist.get_rank() == 0 else [])
    return value

#----------------------------------------------------------------------------

class Collector:
    """Snapshot of the statistics whose names match `regex`, summed over ranks.

    Values reported before the collector's first update() count towards it.
    Every rank must have reported the same names before update(), which is collective.

    With keep_previous, a name that got no new values since the last update keeps its last
    value instead of disappearing from the log.
    """
    def __init__(self, regex='.*', keep_previous=True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._moments = {}

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self, device=None):
        """Take the moments reported since the previous update, summed over ranks; collective.

        Reported values are consumed (moved out of the counters), so each tick's statistics are
        sums over that tick alone, never differences of running totals, which would make a
        resumed run's figures differ from an uninterrupted run's in the last digits.
        """
        if not self._keep_previous:
            self._moments.clear()
        names = sorted(self.names()) # Same order on every rank.
        if device is None:
            device = torch.device('cuda', dist.get_local_rank()) if (dist.is_initialized() and torch.distributed.get_backend() == 'nccl') else torch.device('cpu')
        totals = torch.zeros([len(names), _num_moments], dtype=_reduce_dtype, device=device)
        for row, name in enumerate(names):
            for counter in _counters[name].values():
                totals[row] += counter.to(device)
                counter.zero_()
        dist.all_reduce_sum(totals)
        totals = totals.cpu()
        for row, name in enumerate(names):
            if totals[row, 0] > 0:
                self._moments[name] = totals[row]

    def num(self, name):
        m = self._moments.get(name)
        return int(m[0]) if m is not None else 0

    def mean(self, name):
        m = self._moments.get(name)
        if m is None or m[0] == 0:
            return float('nan')
        return float(m[1] / m[0])

    def std(self, name):
        m = self._moments.get(name)
        if m is None or m[0] == 0 or not np.isfinite(float(m[1])):
            return float('nan')
        if m[0] == 1:
            return 0.0
        mean = float(m[1] / m[0])
        raw_var = float(m[2] / m[0])
        return float(np.sqrt(max(raw_var - mean ** 2, 0)))

    def as_dict(self):
        """{name: {num, mean, std}} for every name with values, ready for json."""
        return {name: dict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in sorted(self._moments)}

    def __getitem__(self, name):
        return self.mean(name)

#----------------------------------------------------------------------------

def reset():
    """Forget every reported value (tests use this to isolate runs in one process)."""
    _counters.clear()

#----------------------------------------------------------------------------

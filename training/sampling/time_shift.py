"""Time-shift sampling: Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling
with Shifted Time Steps" (TS-DPM, ICLR 2024).

A sample x_t produced by the sampler carries more (or less) noise than the training inputs at t;
some nearby time t_s "couples" better with it. TS-DPM finds t_s by matching variances and moves the
sample there. Times are counted on the network's 1000-step training grid: `--cutoff` (no shift at
or below that index) and `--window` (candidates within window/2 on each side) are grid indices.

Two rules, both as small parts of the single sampler loop (`before_step` / `after_step` hooks):

released (the rule of the authors' released ADM code, DDIM path; docs/differences.md):
    at step i >= 1 with scheduled index k_i > cutoff, from the current sample x (VP-scaled),
        v    = unbiased variance of the C*H*W values of x,
        k_s  = argmin_{k in [k_i - w//2, k_i + w//2]} (v - abar[M-1-k])^2,
    the network is still evaluated at the scheduled t_i, but the DDIM step lands at
        abar[k_s - (M // (N - 1)) - 1]
    instead of at t_{i+1} (N = sampling steps). abar[M-1-k], the reversed array, stands in for
    1 - abar[k] (close for the cosine schedule only), and the landing index subtracts a uniform
    stride even for non-uniform schedules; a landing index below 0 lands at sigma = 0. The next
    step then treats the landed VP sample as if it were at the scheduled t_{i+1}.

paper (the rule as the paper states it, for any discretization and solver):
    before step i >= 1 with scheduled index k_i > cutoff,
        k_s  = argmin_{k in window around k_i} (v - (1 - abar[k]))^2,
    and step i starts from t_s = t(k_s) with the VP sample unchanged: the denoiser is evaluated
    at t_s and the step runs from t_s to the scheduled t_{i+1}.

In EDM terms (x = y + sigma n, abar = 1 / (1 + sigma^2)) the VP sample is x / sqrt(1 + sigma^2);
DDIM is Euler in sigma on x; and keeping the VP sample while changing its time label from sigma_a
to sigma_b rescales x by sqrt((1 + sigma_b^2) / (1 + sigma_a^2)).
"""

import torch

from torch_utils import distributed as dist
from training.sampling import sampler as sampler_lib

#----------------------------------------------------------------------------

class TrainingGrid:
    """The M noise levels sigma_0 <= ... <= sigma_{M-1} of a network's discrete training times,
    indexed as DDPM counts time (k = 0 is the least noise)."""

    def __init__(self, sigmas, name):
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.alpha_bar = 1 / (1 + self.sigmas ** 2)
        self.name = name

    def __len__(self):
        return len(self.sigmas)

    @classmethod
    def vp(cls, M=1000, beta_d=19.9, beta_min=0.1):
        # VPPrecond feeds the network c_noise = (M - 1) t, so index k is t = k / (M - 1).
        t = torch.arange(M, dtype=torch.float64) / (M - 1)
        return cls(sampler_lib.vp_sigma(beta_d, beta_min)(t), f'VP (beta_d={beta_d}, beta_min={beta_min}, M={M})')

    @classmethod
    def iddpm(cls, M=1000, C_1=0.001, C_2=0.008):
        # iDDPMPrecond feeds c_noise = M - 1 - j for its level u_j, so index k is u_{M-1-k}.
        u = sampler_lib.iddpm_sigmas(M, C_1, C_2)
        return cls(u[:M].flip(0), f'iDDPM cosine (M={M})')

    @classmethod
    def for_network(cls, net):
        """The network's own grid (VP, iDDPM), else EDM's VP grid as the common time reference."""
        kind = type(net).__name__
        if kind == 'VPPrecond':
            return cls.vp(net.M, net.beta_d, net.beta_min)
        if kind == 'iDDPMPrecond':
            return cls.iddpm(net.M, net.C_1, net.C_2)
        return cls.vp()

    def index_of(self, sigma):
        """Nearest grid index of each noise level (any shape)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (sigma.reshape(-1, 1) - self.sigmas.to(sigma.device)[None, :]).abs().argmin(dim=1).reshape(sigma.shape)

#----------------------------------------------------------------------------

def window_candidates(k, window, M):
    """Grid indices searched around index k: [k - w//2, k + w//2] cut at M - 1; [0, w] near 0."""
    half = window // 2
    if k - half > 0:
        return torch.arange(k - half, min(k + half, M - 1) + 1)
    return torch.arange(0, min(window, M - 1) + 1)

def best_matching_index(variance, candidates, targets):
    """For each sample's variance, the candidate index whose target variance is closest (argmin of
    the squared difference; ties take the first, as torch.argmin)."""
    distance = (variance.reshape(-1, 1) - targets[candidates].to(variance.device)[None, :]) ** 2
    return candidates.to(variance.device)[distance.argmin(dim=1)]

def vp_variance(x_state, t, ode):
    """Unbiased variance over C*H*W of each sample in VP scaling, x / sqrt(1 + sigma^2)."""
    sigma = ode.sigma(t)
    x_vp = x_state / ode.s(t) / (1 + sigma ** 2).sqrt()
    return x_vp.flatten(1).var(dim=1)

def relabel(x_state, t_from, t_to, ode):
    """Keep the VP sample, change its time: the state as it is written at t_to."""
    s_from, s_to = ode.s(t_from), ode.s(t_to)
    sigma_from, sigma_to = ode.sigma(t_from), ode.sigma(t_to)
    return x_state / s_from * ((1 + sigma_to ** 2) / (1 + sigma_from ** 2)).sqrt() * s_to

def per_sample(values, like):
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

#----------------------------------------------------------------------------

class TimeShift:
    """Hooks for sampler.sample(): before_step may move the start time of a step (paper rule) or
    its landing time (released rule); after_step relabels a landed sample to the schedule."""

    def __init__(self,
        grid,                       # TrainingGrid of the network.
        num_steps,                  # Sampling steps N (the released rule's landing stride is M // (N - 1)).
        cutoff      = 300,          # No shift at or below this grid index.
        window      = 80,           # Candidates within window // 2 grid indices of the scheduled one.
        rule        = 'released',   # 'released' or 'paper', see the module docstring.
    ):
        assert rule in ('released', 'paper')
        self.grid = grid
        self.num_steps = num_steps
        self.cutoff = cutoff
        self.window = window
        self.rule = rule
        self.shifted_indices = {} # step -> per-sample chosen indices (for diagnostics and tests).

    def active(self, step, t_cur, ode):
        if step == 0 or self.cutoff >= len(self.grid):
            return None
        k = int(self.grid.index_of(ode.sigma(t_cur).reshape(-1)[0]))
        return k if k > self.cutoff else None

    def before_step(self, step, x_cur, t_cur, t_next, ode):
        """Returns (x, t_start, t_land) for this step."""
        k = self.active(step, t_cur, ode)
        if k is None:
            return x_cur, t_cur, t_next
        M = len(self.grid)
        candidates = window_candidates(k, self.window, M)
        variance = vp_variance(x_cur, t_cur, ode)
        if self.rule == 'released':
            k_s = best_matching_index(variance, candidates, self.grid.alpha_bar.flip(0))
            self.shifted_indices[step] = k_s.cpu()
            land = k_s - M // (self.num_steps - 1) - 1
            # abar[j - 1] for j >= 1, and 1 (sigma = 0) for j = 0 and below; the original indexes a
            # numpy array with the negative index there, which wraps around to the noisiest level.
            sigma_land = torch.where(land >= 0, self.grid.sigmas.to(land.device)[land.clamp(min=0)], torch.zeros_like(land, dtype=torch.float64))
            t_land = ode.sigma_inv(per_sample(sigma_land, x_cur).to(x_cur.device))
            return x_cur, t_cur, t_land
        candidates = candidates[candidates > 0] # sigma = 0 is no time to evaluate a denoiser at.
        k_s = best_matching_index(variance, candidates, 1 - self.grid.alpha_bar)
        self.shifted_indices[step] = k_s.cpu()
        t_shift = ode.sigma_inv(per_sample(self.grid.sigmas.to(k_s.device)[k_s], x_cur).to(x_cur.device))
        return relabel(x_cur, t_cur, t_shift, ode), t_shift, t_next

    def after_step(self, step, x_next, t_land, t_next, ode):
        if t_land is t_next:
            return x_next
        return relabel(x_next, t_land, t_next, ode)

#----------------------------------------------------------------------------

def choose_rule(rule, solver, discretization, net):
    """The rule --ts_rule=auto stands for: the released one where it applies (Euler on the uniform
    grid of a VP or iDDPM network, as in the authors' code), else the paper's, which serves any sampler."""
    if rule != 'auto':
        return rule
    released_applies = solver == 'euler' and discretization in ('vp', 'iddpm') and type(net).__name__ in ('VPPrecond', 'iDDPMPrecond')
    return 'released' if released_applies else 'paper'

def check_time_shift(rule, cutoff, window, solver, discretization, net):
    """ValueError with a readable reason for settings time shift cannot serve."""
    if window < 1:
        raise ValueError(f'--window must be at least 1, got {window}')
    if not 0 <= cutoff <= 1000:
        raise ValueError(f'--cutoff must be in [0, 1000], got {cutoff}')
    if rule == 'released':
        if solver != 'euler':
            raise ValueError('--ts_rule=released is the DDIM (Euler) rule of the authors\' code: add --solver=euler, or use --ts_rule=paper with Heun')
        if discretization not in ('vp', 'iddpm') or type(net).__name__ not in ('VPPrecond', 'iDDPMPrecond'):
            raise ValueError('--ts_rule=released needs a network trained on 1000 discrete steps (VP or iDDPM preconditioning) '
                'and --disc=vp or --disc=iddpm, whose steps are uniform on that grid; use --ts_rule=paper for other discretizations')

#----------------------------------------------------------------------------

def from_options(net, sampler_kwargs, rule='auto', cutoff=300, window=80):
    """The TimeShift of generate.py's --do_time_shift for `net` sampled with `sampler_kwargs`
    (--ts_rule=auto resolved, see choose_rule); ValueError with a readable reason for settings it
    cannot serve."""
    solver = sampler_kwargs.get('solver') or 'heun'
    discretization = sampler_kwargs.get('discretization') or 'edm'
    rule = choose_rule(rule, solver, discretization, net)
    dist.print0(f'Time shift: the {rule} rule (--ts_rule={rule}), cutoff {cutoff}, window {window}')
    check_time_shift(rule, cutoff, window, solver, discretization, net)
    if sampler_kwargs.get('S_churn'):
        raise ValueError('--do_time_shift works with deterministic sampling only; leave --S_churn at 0')
    return TimeShift(TrainingGrid.for_network(net), num_steps=sampler_kwargs['num_steps'], cutoff=cutoff, window=window, rule=rule)

#----------------------------------------------------------------------------

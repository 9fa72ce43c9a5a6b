"""The sampler loop solves the probability-flow ODE; checked against a closed-form solution."""

import itertools

import numpy as np
import pytest
import torch

from training.sampling import generation
from training.sampling import sampler

#----------------------------------------------------------------------------
# Data y ~ N(0, c^2 I) has the exact denoiser D(x; sigma) = c^2 / (c^2 + sigma^2) x, and the
# probability-flow ODE carries x(sigma_max) = sigma_max * n to x(0) = c * sigma_max / sqrt(c^2 + sigma_max^2) * n.

class GaussianDataNet(torch.nn.Module):
    """Stands in for a preconditioned network: exact denoiser of N(0, c^2 I)."""
    def __init__(self, c=0.5, sigma_min=0, sigma_max=float('inf')):
        super().__init__()
        self.c, self.sigma_min, self.sigma_max = c, sigma_min, sigma_max
        self.img_channels, self.img_resolution, self.label_dim = 1, 4, 0

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (self.c ** 2 / (self.c ** 2 + sigma ** 2) * x.to(torch.float64)).to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

def exact_result(latents, sigma_max, c=0.5):
    return latents.to(torch.float64) * (c * sigma_max / np.sqrt(c ** 2 + sigma_max ** 2))

def relative_error(x, y):
    return float((x - y).norm() / y.norm())

LATENTS = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))

#----------------------------------------------------------------------------

def test_edm_sampler_solves_the_ode_and_heun_beats_euler():
    net = GaussianDataNet()
    exact = exact_result(LATENTS, 80)
    heun = [relative_error(sampler.edm_sampler(net, LATENTS, num_steps=n), exact) for n in [18, 36]]
    euler = [relative_error(sampler.ablation_sampler(net, LATENTS, num_steps=n, solver='euler'), exact) for n in [18, 36]]
    assert heun[1] < 0.02 and heun[0] / heun[1] > 3.5 # Second order.
    assert 1.7 < euler[0] / euler[1] < 2.3 # First order.
    assert euler[1] > heun[1] * 5

@pytest.mark.slow
@pytest.mark.parametrize('disc,schedule,scaling', list(itertools.product(['vp', 've', 'iddpm', 'edm'], ['vp', 've', 'linear'], ['vp', 'none'])))
def test_every_ablation_configuration_converges_to_the_ode_solution_at_second_order(disc, schedule, scaling):
    net = GaussianDataNet()
    errors = []
    for num_steps in [32, 64, 128]:
        sigma_steps, _ = sampler.ablation_sigma_steps(net, num_steps=num_steps, discretization=disc)
        x = sampler.ablation_sampler(net, LATENTS, num_steps=num_steps, discretization=disc, schedule=schedule, scaling=scaling)
        errors.append(relative_error(x, exact_result(LATENTS, float(sigma_steps[0]))))
    assert errors[0] / errors[1] > 2.5 # Heun: halving the step size divides the error by about 4.
    assert errors[2] < 0.4

def test_generalized_sampler_with_edm_settings_matches_edm_sampler():
    net = GaussianDataNet()
    a = sampler.edm_sampler(net, LATENTS, num_steps=10)
    b = sampler.ablation_sampler(net, LATENTS, num_steps=10, discretization='edm', schedule='linear', scaling='none', solver='heun')
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)

def test_time_steps_follow_edm_eq5_and_respect_the_network_range():
    net = GaussianDataNet(sigma_min=0.01, sigma_max=50)
    t = sampler.edm_time_steps(net, num_steps=5, sigma_min=0.002, sigma_max=80, rho=7)
    assert t.dtype == torch.float64 and len(t) == 6 and t[-1] == 0
    assert float(t[0]) == pytest.approx(50) and float(t[-2]) == pytest.approx(0.01)
    ramp = (t[:-1] ** (1 / 7)).numpy()
    assert np.allclose(np.diff(ramp), np.diff(ramp)[0]) # Uniform in sigma^(1/rho).

def test_iddpm_levels_decrease_to_zero():
    u = sampler.iddpm_sigmas(M=1000)
    assert len(u) == 1001 and u[-1] == 0 and torch.all(u[:-1] > u[1:])
    sigma_steps, _ = sampler.ablation_sigma_steps(GaussianDataNet(), num_steps=10, discretization='iddpm')
    assert all(bool((u == s).any()) for s in sigma_steps) # The steps are a subset of the levels...
    assert 80 < float(sigma_steps[0]) <= 81 and 0.002 <= float(sigma_steps[-1]) < 0.01 # ...within the default range.

def test_churn_adds_noise_only_inside_its_sigma_window():
    net = GaussianDataNet()
    plain = sampler.edm_sampler(net, LATENTS, num_steps=8)
    outside = sampler.edm_sampler(net, LATENTS, num_steps=8, S_churn=40, S_min=1000, S_max=2000)
    inside = sampler.edm_sampler(net, LATENTS, num_steps=8, S_churn=40, S_min=0.01, S_max=50)
    assert torch.equal(plain, outside)
    assert not torch.allclose(plain, inside)

#----------------------------------------------------------------------------
# Seeds and batches.

def test_each_sample_draws_only_from_its_own_seed():
    together = sampler.StackedRandomGenerator('cpu', [3, 5, 7]).randn([3, 2, 4, 4])
    alone = torch.cat([sampler.StackedRandomGenerator('cpu', [s]).randn([1, 2, 4, 4]) for s in [3, 5, 7]])
    assert torch.equal(together, alone)

@pytest.mark.parametrize('spec,expected', [('0-3', [0, 1, 2, 3]), ('1,2,5-7', [1, 2, 5, 6, 7]), ('4', [4]), ('2-2', [2])])
def test_seed_lists_parse(spec, expected):
    assert generation.parse_seeds(spec) == expected

@pytest.mark.parametrize('spec', ['5-2', 'x', '1,,2', '-3', '1-2-3', ''])
def test_bad_seed_lists_are_rejected(spec):
    with pytest.raises(ValueError):
        generation.parse_seeds(spec)

@pytest.mark.parametrize('num_seeds,batch,world', [(1, 4, 1), (10, 4, 1), (10, 4, 3), (64, 64, 2), (7, 100, 4)])
def test_ranks_share_all_seeds_exactly_once(num_seeds, batch, world):
    seeds = list(range(100, 100 + num_seeds))
    shares = [generation.rank_batches(seeds, batch, rank, world) for rank in range(world)]
    flat = sorted(int(s) for share in shares for b in share for s in b)
    assert flat == seeds
    assert all(0 < len(b) <= batch for share in shares for b in share)

#----------------------------------------------------------------------------

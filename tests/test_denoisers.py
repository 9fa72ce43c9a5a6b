"""The denoiser protocol (training/sampling/denoisers.py), generation.compose and the one sampling plan."""

import itertools

import pytest
import torch
from click.testing import CliRunner

import generate
from conftest import make_tiny_net
from training.sampling import denoisers
from training.guidance import discriminator_guidance as dg
from training.sampling import epsilon_scaling
from training.evaluation import exposure_bias_metrics as metrics
from training.sampling import generation
from training.sampling import sampler

#----------------------------------------------------------------------------
# Analytic pieces, so that every comparison is exact.

def gaussian_data(x, sigma, step):
    """D(x; sigma) of N(0, I) data: x / (1 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return x.to(torch.float64) / (1 + sigma ** 2)

class FakeGuidance:
    """A guidance term c = 0.1 x that the discriminator 'dislikes' for the first half of the batch."""
    def __init__(self):
        self.calls = 0

    def correction(self, x, sigma, class_labels=None):
        self.calls += 1
        log_r = torch.where(torch.arange(x.shape[0]) < x.shape[0] // 2, -1.0, 1.0).to(torch.float64)
        return 0.1 * x, log_r

def latents(n=4, seed=0):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

T_STEPS = torch.tensor([10.0, 5.0, 3.0, 1.5, 1.0, 0.6, 0.3, 0.0], dtype=torch.float64) # 7 steps: boosting's churn comes at step 5.

def noise_source(n=4):
    return sampler.StackedRandomGenerator('cpu', list(range(n))).randn_like

#----------------------------------------------------------------------------

def guided(eps_outside=True, boosting=True, weight_2nd_order=0.0):
    guidance = FakeGuidance()
    boost = dg.Boosting() if boosting else None
    if eps_outside:
        inner = dg.with_discriminator_guidance(gaussian_data, guidance, weight_1st_order=1.5, weight_2nd_order=weight_2nd_order, boosting=boost)
        return epsilon_scaling.with_epsilon_scaling(inner, eps_scaler=1.1), guidance
    inner = epsilon_scaling.with_epsilon_scaling(gaussian_data, eps_scaler=1.1)
    return dg.with_discriminator_guidance(inner, guidance, weight_1st_order=1.5, weight_2nd_order=weight_2nd_order, boosting=boost), guidance

@pytest.mark.parametrize('eps_outside', [False, True])
def test_every_wrapper_keeps_the_second_order_and_the_churn(eps_outside):
    denoise, guidance = guided(eps_outside)
    recorder = metrics.StepRecorder()
    watched = denoisers.observed(denoise, recorder.observe)
    for d in (denoise, watched):
        assert isinstance(d, denoisers.Denoiser)
        assert d.churn is not None and d.second_order is not d.first_order
    x, sigma = latents(), torch.tensor(2.0, dtype=torch.float64)
    # The second order is unguided: one guidance evaluation per first-order call only.
    guidance.calls = 0
    assert torch.equal(watched.second_order(x, sigma, 0), denoise.second_order(x, sigma, 0))
    assert guidance.calls == 0
    assert torch.equal(watched(x, sigma, 0), denoise(x, sigma, 0))
    assert guidance.calls == 2
    assert recorder.count == {0: 4} # The recorder outside both sees the evaluations.

def test_a_plain_callable_is_a_denoiser_without_parts():
    plain = denoisers.as_denoiser(gaussian_data)
    assert plain.first_order is gaussian_data and plain.second_order is gaussian_data and plain.churn is None
    assert plain.churn_at(3, 0.5, 1.0) == (0.5, 1.0)
    for solver in ('euler', 'heun'):
        a = sampler.sample(gaussian_data, latents(), T_STEPS, solver=solver, randn_like=noise_source(), S_churn=5)
        b = sampler.sample(plain, latents(), T_STEPS, solver=solver, randn_like=noise_source(), S_churn=5)
        assert torch.equal(a, b)

def test_the_order_of_wrapping_does_not_lose_the_parts_in_the_sampler():
    """Epsilon scaling outside or inside guidance: the sampler still leaves the correction unguided
    and applies the boosting churn, so the result equals the denoiser written out by hand."""
    for eps_outside in (False, True):
        denoise, guidance = guided(eps_outside, boosting=True)
        result = sampler.sample(denoise, latents(), T_STEPS, solver='heun', randn_like=noise_source())

        scale = lambda d, x: x - (x - d) / 1.1
        boost = dg.Boosting()
        def first(x, sigma, step):
            c, log_r = guidance.correction(x, sigma)
            w = 1.5 * boost.weight_factor(step, log_r)[:, None, None, None]
            d = gaussian_data(x, sigma, step)
            return scale(d - w * c, x) if eps_outside else scale(d, x) - w * c
        by_hand = denoisers.Denoiser(first, lambda x, sigma, step: scale(gaussian_data(x, sigma, step), x), churn=boost.churn)
        expected = sampler.sample(by_hand, latents(), T_STEPS, solver='heun', randn_like=noise_source())
        assert torch.allclose(result, expected, rtol=1e-12, atol=1e-12)
        # Dropping a part changes the images: the test can fail.
        dropped = sampler.sample(denoisers.Denoiser(denoise.first_order), latents(), T_STEPS, solver='heun', randn_like=noise_source())
        assert not torch.allclose(result, dropped)

def test_per_sample_churn_with_a_constant_is_the_scalar_churn_to_the_bit():
    n = 4
    constant = lambda step, S_churn, S_noise: (torch.full([n], float(S_churn), dtype=torch.float64), torch.full([n], float(S_noise), dtype=torch.float64))
    for S_churn, S_min, S_max, S_noise in [(10, 0.05, 50, 1.0), (40, 0, float('inf'), 1.007), (3, 2.0, 5.0, 1.0)]:
        kwargs = dict(randn_like=noise_source(n), S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
        scalar = sampler.sample(gaussian_data, latents(n), T_STEPS, **kwargs)
        kwargs['randn_like'] = noise_source(n)
        per_sample = sampler.sample(denoisers.Denoiser(gaussian_data, churn=constant), latents(n), T_STEPS, **kwargs)
        assert torch.equal(scalar, per_sample)

def test_churn_gamma_is_edms_formula():
    assert sampler.churn_gamma(0, 18, torch.tensor(1.0)) == 0
    assert float(sampler.churn_gamma(10, 18, torch.tensor(1.0, dtype=torch.float64), 0.05, 50)) == min(10 / 18, 2 ** 0.5 - 1)
    assert float(sampler.churn_gamma(40, 18, torch.tensor(1.0, dtype=torch.float64))) == 2 ** 0.5 - 1
    assert float(sampler.churn_gamma(10, 18, torch.tensor(60.0, dtype=torch.float64), 0.05, 50)) == 0
    per_sample = sampler.churn_gamma(torch.tensor([0.0, 4.0, 100.0], dtype=torch.float64), 10, torch.tensor(1.0))
    assert per_sample.tolist() == [0.0, 0.4, 2 ** 0.5 - 1]

#----------------------------------------------------------------------------
# compose: one order, used by generate.py and the eps-norm tools.

def test_compose_states_the_sedm_g_order_and_adds_nothing_when_off():
    net = make_tiny_net()
    plain = generation.compose(net)
    assert plain.layers == ('network(EDMPrecond)',) and plain.churn is None and plain.second_order is plain.first_order
    guidance = FakeGuidance()
    full = generation.compose(net, corrections=generation.Corrections(eps_scaler=1.004, kappa=0.001, guidance=guidance,
        dg_weight_1st_order=1.67, boosting=True))
    assert [layer.split('(')[0] for layer in full.layers] == ['network', 'epsilon_scaling', 'discriminator_guidance']
    assert full.churn is not None and full.second_order is not full.first_order

def captured_denoisers(monkeypatch):
    seen = []
    run_settings = sampler.run_settings
    def capture(net, latents, class_labels=None, randn_like=torch.randn_like, denoise=None, sampler_kwargs={}):
        seen.append(denoise)
        return run_settings(net, latents, class_labels, randn_like, denoise, sampler_kwargs)
    monkeypatch.setattr(sampler, 'run_settings', capture)
    return seen

def test_generate_and_the_eps_norm_tools_compose_the_same_denoiser(monkeypatch, tmp_path, cond_net_pkl):
    seen = captured_denoisers(monkeypatch)
    flags = ['--steps=3', '--eps_scaler=1.004', '--kappa=0.001', '--solver=euler']
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={cond_net_pkl}', '--seeds=0-1', f'--outdir={tmp_path / "out"}', *flags])
    assert result.exit_code == 0, result.output
    from_generate = seen.pop()

    net = make_tiny_net(label_dim=4)
    metrics.consecutive_statistics(net, [0, 1], dict(num_steps=3, solver='euler'), eps_scaler=1.004, kappa=0.001, batch_size=2)
    from_eps_norm = seen.pop()
    assert from_generate.layers == from_eps_norm.layers == ('network(EDMPrecond)', 'epsilon_scaling(eps_scaler=1.004, kappa=0.001)')
    for d in (from_generate, from_eps_norm):
        assert d.churn is None and d.second_order is d.first_order

    # Plain flags: both are the bare network.
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={cond_net_pkl}', '--seeds=0', f'--outdir={tmp_path / "plain"}', '--steps=2'])
    assert result.exit_code == 0, result.output
    metrics.consecutive_statistics(net, [0], dict(num_steps=2), batch_size=1)
    assert seen[0].layers == seen[1].layers == ('network(EDMPrecond)',)

#----------------------------------------------------------------------------
# One plan from flags to (time steps, ODE, solver).

SETTINGS = [dict(num_steps=5), dict(num_steps=5, sigma_min=0.01, rho=5), dict(num_steps=4, solver='euler'),
    dict(num_steps=5, discretization='vp', schedule='vp', scaling='vp'), dict(num_steps=5, discretization='ve', schedule='ve'),
    dict(num_steps=5, discretization='iddpm', solver='euler'), dict(num_steps=5, discretization='edm', scaling='vp')]

@pytest.mark.parametrize('settings', SETTINGS, ids=lambda s: ','.join(f'{k}={v}' for k, v in s.items()))
def test_the_plan_is_the_sampler_edms_rule_selects(settings):
    net = make_tiny_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    sampler_fn = sampler.ablation_sampler if generation.uses_ablation_sampler(settings) else sampler.edm_sampler
    with torch.no_grad():
        expected = sampler_fn(net, x, **settings)
        got = sampler.run_settings(net, x, sampler_kwargs=settings)
    assert torch.equal(expected, got)
    plan = sampler.plan_from_settings(net, settings)
    assert plan.solver == settings.get('solver', 'heun')
    assert isinstance(plan.ode, sampler.EDMProbabilityFlowODE) == (not generation.uses_ablation_sampler(settings))
    # The noise levels the eps-norm tools measure at are those the time steps were made from.
    if generation.uses_ablation_sampler(settings):
        keys = ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'discretization')
        sigma_steps = net.round_sigma(sampler.ablation_sigma_steps(net, **{k: settings[k] for k in keys if k in settings})[0])
    else:
        sigma_steps = sampler.edm_time_steps(net, **settings)[:-1]
    assert torch.equal(metrics.sampler_sigmas(net, settings), sigma_steps)
    assert torch.allclose(plan.ode.sigma(plan.t_steps[:-1]), plan.sigma_steps, rtol=1e-9)

#----------------------------------------------------------------------------

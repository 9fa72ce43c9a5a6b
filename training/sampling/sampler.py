"""The sampler: one loop over noise levels that every method of this codebase plugs into.

The loop integrates the probability-flow ODE of EDM (Karras et al. 2022, eq. 4, Algorithm 1/2)
with Euler or Heun steps and optional stochastic churn. It sees the model only through a
denoiser `denoise(x, sigma, step) -> D(x; sigma)` (float64), so that

- epsilon scaling, discriminator guidance and the optimal denoiser are denoisers that wrap or
  replace the network one (training/sampling/epsilon_scaling.py, training/guidance/discriminator_guidance.py,
  training/sampling/optimal_denoiser.py); what a denoiser is (its first- and second-order evaluations and
  optional per-sample churn) is written down in training/sampling/denoisers.py, and
  training.sampling.generation.compose puts the corrections together;
- which time steps, ODE and solver a set of flags means is decided once, by plan_from_settings;
- the ODE (sigma(t), s(t)) and the time steps are plain values you can print and test;
- time shift decides, per sample, where a step starts or lands (training/sampling/time_shift.py).

With the defaults, `edm_sampler` and `ablation_sampler` perform exactly the floating-point
operations of NVIDIA EDM's generate.py, so the same pickle and seeds give the same uint8 images.
"""

import numpy as np
import torch

from training.sampling import denoisers

#----------------------------------------------------------------------------
# Noise level discretizations. Each returns the float64 noise levels
# sigma_0 > ... > sigma_{N-1} (the final sigma_N = 0 is appended later).

def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80, rho=7, device=None):
    """EDM eq. 5: uniform steps in sigma^(1/rho)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho

def vp_sigma(beta_d, beta_min):
    return lambda t: (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5

def vp_sigma_deriv(beta_d, beta_min):
    sigma = vp_sigma(beta_d, beta_min)
    return lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

def vp_time_from_integral(integral, beta_d, beta_min):
    """The VP time t >= 0 at which the integral of beta, beta_min t + beta_d t^2 / 2, equals `integral`
    (a tensor); at noise level sigma that integral is log(1 + sigma^2)."""
    return ((beta_min ** 2 + 2 * beta_d * integral).sqrt() - beta_min) / beta_d

def vp_sigma_inv(beta_d, beta_min):
    return lambda sigma: vp_time_from_integral((sigma ** 2 + 1).log(), beta_d, beta_min)

def iddpm_sigmas(M=1000, C_1=0.001, C_2=0.008, device=None):
    """The M+1 noise levels u_0 > ... > u_M = 0 of the iDDPM cosine schedule (EDM Appendix C.3.4)."""
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)
    alpha_bar = lambda j: (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    for j in torch.arange(M, 0, -1, device=device):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u

# Defaults of the ablation sampler when --sigma_min/--sigma_max are not given (EDM Table 1).
VP_EPSILON_S = 1e-3
ABLATION_SIGMA_MIN = {'vp': float(vp_sigma(19.9, 0.1)(VP_EPSILON_S)), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}
ABLATION_SIGMA_MAX = {'vp': float(vp_sigma(19.9, 0.1)(1)), 've': 100, 'iddpm': 81, 'edm': 80}

#----------------------------------------------------------------------------
# The ODE being solved: x(t) = s(t) * (y + sigma(t) n), EDM eq. 4,
#   dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t) / sigma(t) * D(x/s(t); sigma(t)).

class ProbabilityFlowODE:
    def __init__(self, sigma, sigma_deriv, sigma_inv, s, s_deriv, name='custom'):
        self.sigma = sigma              # t -> noise level.
        self.sigma_deriv = sigma_deriv  # t -> d sigma / dt.
        self.sigma_inv = sigma_inv      # noise level -> t.
        self.s = s                      # t -> signal scale (1 = no scaling).
        self.s_deriv = s_deriv          # t -> d s / dt.
        self.name = name

    def direction(self, x, t, denoised):
        return (self.sigma_deriv(t) / self.sigma(t) + self.s_deriv(t) / self.s(t)) * x - self.sigma_deriv(t) * self.s(t) / self.sigma(t) * denoised

    def __repr__(self):
        return f'ProbabilityFlowODE({self.name})'

class EDMProbabilityFlowODE(ProbabilityFlowODE):
    """sigma(t) = t, s(t) = 1 (EDM's choice): dx/dt = (x - D(x; t)) / t = the predicted noise."""
    def __init__(self):
        identity = lambda t: t
        super().__init__(sigma=identity, sigma_deriv=lambda t: 1, sigma_inv=identity, s=lambda t: 1, s_deriv=lambda t: 0, name='edm')

    def direction(self, x, t, denoised):
        return (x - denoised) / t

def ablation_ode(schedule='linear', scaling='none', vp_beta_d=19.9, vp_beta_min=0.1):
    """The ODE of EDM's generalized sampler for --schedule vp|ve|linear and --scaling vp|none."""
    if schedule == 'vp':
        sigma, sigma_deriv, sigma_inv = vp_sigma(vp_beta_d, vp_beta_min), vp_sigma_deriv(vp_beta_d, vp_beta_min), vp_sigma_inv(vp_beta_d, vp_beta_min)
    elif schedule == 've':
        sigma, sigma_deriv, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda sigma: sigma ** 2)
    elif schedule == 'linear':
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: 1), (lambda sigma: sigma)
    else:
        raise ValueError(f'Unknown schedule "{schedule}"')
    if scaling == 'vp':
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    elif scaling == 'none':
        s, s_deriv = (lambda t: 1), (lambda t: 0)
    else:
        raise ValueError(f'Unknown scaling "{scaling}"')
    return ProbabilityFlowODE(sigma, sigma_deriv, sigma_inv, s, s_deriv, name=f'schedule={schedule},scaling={scaling}')

#----------------------------------------------------------------------------
# Denoisers: what the loop calls, see training/sampling/denoisers.py (a plain callable
# (x, sigma, step) -> float64 D(x; sigma) is one without extra parts).

def network_denoiser(net, class_labels=None):
    """The plain denoiser of a preconditioned network (VPPrecond, EDMPrecond, ...)."""
    return denoisers.network(net, class_labels)

#----------------------------------------------------------------------------
# The loop.

def churn_gamma(S_churn, num_steps, sigma_cur, S_min=0, S_max=float('inf')):
    """EDM Algorithm 2's gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0.

    S_churn is one number or a float64 tensor of one per sample; gamma is then a float64 tensor of
    the same shape (a 0-d one for a number, whose products are those of the number). Without churn
    gamma is 0 and sigma_i, which time shift makes per-sample, is not compared.
    """
    if not torch.is_tensor(S_churn) and S_churn == 0:
        return 0
    in_range = float(S_min <= sigma_cur <= S_max)
    return torch.as_tensor(S_churn / num_steps, dtype=torch.float64).clip(max=np.sqrt(2) - 1) * in_range

def sample(denoise, latents, t_steps, ode=None, solver='heun', randn_like=torch.randn_like,
    round_sigma=torch.as_tensor, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, time_shift=None):
    """Integrate from t_steps[0] to t_steps[-1] (= 0) and return the float64 result.

    t_steps     -- float64 times t_0 > ... > t_{N-1} > t_N = 0 (of the ODE's time variable).
    ode         -- ProbabilityFlowODE; default EDMProbabilityFlowODE().
    denoise     -- a training.sampling.denoisers.Denoiser or a plain callable (x, sigma, step) -> D. Its
                   parts are used explicitly: first_order for the Euler evaluation, second_order
                   for the Heun correction, churn for per-sample (S_churn, S_noise).
    solver      -- 'euler' or 'heun' (2nd order correction on all but the last step).
    randn_like  -- noise source for churn (per-seed generators in generate.py).
    round_sigma -- snaps noise levels onto those the network supports (iDDPM).
    S_*         -- stochastic churn of EDM Algorithm 2.
    time_shift  -- optional training.sampling.time_shift.TimeShift: may move where a step starts or lands,
                   per sample (times then become [N, 1, 1, 1] tensors).
    """
    ode = ode if ode is not None else EDMProbabilityFlowODE()
    assert solver in ('euler', 'heun')
    if time_shift is not None and S_churn != 0:
        raise ValueError('time shift works with deterministic sampling only (S_churn=0)')
    num_steps = len(t_steps) - 1
    sigma, s = ode.sigma, ode.s
    denoiser = denoisers.as_denoiser(denoise)
    denoise_1st, denoise_2nd = denoiser.first_order, denoiser.second_order
    if denoiser.churn is not None and time_shift is not None:
        raise ValueError('per-sample churn (boosting) and time shift cannot be combined')

    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sigma(t_next) * s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        t_land = t_next # Where the step ends; only time shift makes it differ.
        if time_shift is not None:
            x_cur, t_cur, t_land = time_shift.before_step(i, x_cur, t_cur, t_next, ode)

        # Increase the noise temporarily (churn). The noise is drawn at every
        # step, as in EDM, so that each seed's random stream does not depend on
        # S_min/S_max.
        # (S_churn, S_noise) are the flags' scalars, or per-sample [N, 1, 1, 1] (boosting of
        # discriminator guidance); gamma has their shape.
        churn, noise_scale = (v.to(torch.float64).reshape(-1, 1, 1, 1) if torch.is_tensor(v) else v for v in denoiser.churn_at(i, S_churn, S_noise))
        gamma = churn_gamma(churn, num_steps, sigma(t_cur), S_min, S_max)
        t_hat = ode.sigma_inv(round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = s(t_hat) / s(t_cur) * x_cur + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * noise_scale * randn_like(x_cur)

        # Euler step.
        h = t_land - t_hat
        denoised = denoise_1st(x_hat / s(t_hat), sigma(t_hat), i)
        d_cur = ode.direction(x_hat, t_hat, denoised)
        x_next = x_hat + h * d_cur

        # 2nd order correction at the end point of the Euler step. EDM's
        # generalized sampler reaches that point as t_hat + h rather than t_next
        # (equal up to rounding); its arithmetic is kept so images match to the bit.
        if solver == 'heun' and i < num_steps - 1:
            t_prime = t_land if isinstance(ode, EDMProbabilityFlowODE) else t_hat + h
            denoised = denoise_2nd(x_next / s(t_prime), sigma(t_prime), i)
            d_prime = ode.direction(x_next, t_prime, denoised)
            x_next = x_hat + h * (0.5 * d_cur + 0.5 * d_prime)

        if time_shift is not None:
            x_next = time_shift.after_step(i, x_next, t_land, t_next, ode)
    return x_next

#----------------------------------------------------------------------------
# EDM's two samplers as configurations of the loop.

def edm_time_steps(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, device=None):
    """Time steps of EDM's sampler (Algorithm 2), limited to the network's supported range."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    sigma_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)
    return torch.cat([net.round_sigma(sigma_steps), torch.zeros_like(sigma_steps[:1])])

def edm_plan(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, device=None):
    """EDM Algorithm 2's SamplingPlan: its time steps, sigma(t) = t, s(t) = 1, Heun."""
    t_steps = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, device=device)
    return SamplingPlan(t_steps, EDMProbabilityFlowODE(), 'heun', t_steps[:-1])

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, denoise=None, time_shift=None):
    """EDM Algorithm 2 (Heun, sigma(t) = t, s(t) = 1). `denoise` replaces the network's denoiser."""
    plan = edm_plan(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    return run_plan(plan, net, latents, class_labels, randn_like, denoise, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, time_shift=time_shift)

def ablation_sigma_steps(net, num_steps=18, sigma_min=None, sigma_max=None, rho=7, discretization='edm',
    epsilon_s=VP_EPSILON_S, C_1=0.001, C_2=0.008, M=1000, device=None):
    """Noise levels of EDM's generalized sampler (EDM Table 1, Algorithm 1).

    Returns (sigma_steps, ode_kwargs); ode_kwargs are the VP betas fitted to the sigma range,
    which the 'vp' schedule uses.
    """
    if discretization not in ABLATION_SIGMA_MIN:
        raise ValueError(f'Unknown discretization "{discretization}"')
    sigma_min = sigma_min if sigma_min is not None else ABLATION_SIGMA_MIN[discretization]
    sigma_max = sigma_max if sigma_max is not None else ABLATION_SIGMA_MAX[discretization]
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # VP betas that make sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max.
    vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d

    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if discretization == 'vp':
        sigma_steps = vp_sigma(vp_beta_d, vp_beta_min)(1 + i / (num_steps - 1) * (epsilon_s - 1))
    elif discretization == 've':
        sigma_steps = ((sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1)))).sqrt()
    elif discretization == 'iddpm':
        u = iddpm_sigmas(M, C_1, C_2, device=device)
        u = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        sigma_steps = u[((len(u) - 1) / (num_steps - 1) * i).round().to(torch.int64)]
    else:
        sigma_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)

    ode_kwargs = dict(vp_beta_d=vp_beta_d, vp_beta_min=vp_beta_min)
    return sigma_steps, ode_kwargs

def ablation_plan(net, num_steps=18, sigma_min=None, sigma_max=None, rho=7, solver='heun', discretization='edm', schedule='linear',
    scaling='none', epsilon_s=VP_EPSILON_S, C_1=0.001, C_2=0.008, M=1000, device=None):
    """The SamplingPlan of EDM's generalized sampler (--solver --disc --schedule --scaling)."""
    sigma_steps, ode_kwargs = ablation_sigma_steps(net, num_steps, sigma_min, sigma_max, rho, discretization, epsilon_s, C_1, C_2, M, device=device)
    ode = ablation_ode(schedule, scaling, **ode_kwargs)
    sigma_steps = net.round_sigma(sigma_steps)
    t_steps = ode.sigma_inv(sigma_steps)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    return SamplingPlan(t_steps, ode, solver, sigma_steps.to(torch.float64))

def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=None, sigma_max=None, rho=7,
    solver='heun', discretization='edm', schedule='linear', scaling='none', epsilon_s=VP_EPSILON_S, C_1=0.001, C_2=0.008, M=1000,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, denoise=None, time_shift=None):
    """EDM's generalized sampler (--solver --disc --schedule --scaling)."""
    plan = ablation_plan(net, num_steps, sigma_min, sigma_max, rho, solver, discretization, schedule, scaling, epsilon_s, C_1, C_2, M, device=latents.device)
    return run_plan(plan, net, latents, class_labels, randn_like, denoise, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, time_shift=time_shift)

#----------------------------------------------------------------------------
# From flags to a sampler: the one place that decides, for generation, the eps-norm tools and the
# study, which time steps, ODE and solver a set of sampler settings means.

class SamplingPlan:
    """What the loop integrates: time steps (with the final 0), the ODE, the solver, and the noise
    levels sigma(t_i) of the steps' first evaluations as the time steps were made from them."""
    def __init__(self, t_steps, ode, solver, sigma_steps):
        self.t_steps, self.ode, self.solver, self.sigma_steps = t_steps, ode, solver, sigma_steps

    def __repr__(self):
        return f'SamplingPlan({len(self.t_steps) - 1} steps, {self.ode!r}, {self.solver})'

# Settings of the generalized sampler; giving any of them selects it (EDM's generate.py rule).
ABLATION_SETTINGS = ('solver', 'discretization', 'schedule', 'scaling')
# Settings of the loop itself rather than of the plan.
LOOP_SETTINGS = ('S_churn', 'S_min', 'S_max', 'S_noise', 'time_shift')

def uses_ablation_sampler(sampler_kwargs):
    """EDM's rule: any of --solver/--disc/--schedule/--scaling selects the generalized sampler."""
    return any(sampler_kwargs.get(k) is not None for k in ABLATION_SETTINGS)

def plan_from_settings(net, sampler_kwargs, device=None):
    """The SamplingPlan of generate.py's sampler settings (edm_sampler / ablation_sampler keywords;
    None values mean default, loop settings are ignored). TypeError for an unknown keyword."""
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None and k not in LOOP_SETTINGS}
    plan_fn = ablation_plan if uses_ablation_sampler(kwargs) else edm_plan
    return plan_fn(net, device=device, **kwargs)

def run_plan(plan, net, latents, class_labels=None, randn_like=torch.randn_like, denoise=None, **loop_kwargs):
    """sample() along `plan`, with the network's denoiser unless `denoise` is given."""
    denoise = denoise if denoise is not None else network_denoiser(net, class_labels)
    return sample(denoise, latents, plan.t_steps, ode=plan.ode, solver=plan.solver, randn_like=randn_like, round_sigma=net.round_sigma, **loop_kwargs)

def run_settings(net, latents, class_labels=None, randn_like=torch.randn_like, denoise=None, sampler_kwargs={}):
    """Sample with generate.py's sampler settings (see plan_from_settings); the same images as
    edm_sampler / ablation_sampler with those keywords."""
    plan = plan_from_settings(net, sampler_kwargs, device=latents.device)
    loop_kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None and k in LOOP_SETTINGS}
    return run_plan(plan, net, latents, class_labels, randn_like, denoise, **loop_kwargs)

#----------------------------------------------------------------------------
# Per-seed random numbers: sample k of a batch always draws from its own
# generator seeded with seeds[k], so an image depends only on its seed, not
# on the batch it was generated in or on the rank that generated it.

class StackedRandomGenerator:
    """torch.randn / randn_like / randint for a batch whose k-th sample draws only from a
    torch.Generator of its own, seeded with seeds[k] modulo 2**32 (the seed range torch accepts)."""

    def __init__(self, device, seeds):
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device)
            generator.manual_seed(int(seed) % 2**32)
            self.generators.append(generator)

    def _per_sample(self, draw, size):
        """torch.stack of draw(shape of one sample, its generator); size[0] must be the batch size."""
        num_samples, *sample_shape = size
        if num_samples != len(self.generators):
            raise ValueError(f'a draw of size {list(size)} for a batch of {len(self.generators)} seeds')
        return torch.stack([draw(sample_shape, generator) for generator in self.generators])

    def randn(self, size, **kwargs):
        return self._per_sample(lambda shape, generator: torch.randn(shape, generator=generator, **kwargs), size)

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        return self._per_sample(lambda shape, generator: torch.randint(*args, size=shape, generator=generator, **kwargs), size)

#----------------------------------------------------------------------------

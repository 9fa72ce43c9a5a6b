"""Epsilon scaling: Ning et al., "Elucidating the Exposure Bias in Diffusion Models" (ICLR 2024).

During sampling the network's predicted noise is systematically larger than during training (the
sampled x_t drifts away from the training inputs, Sec. 4). Dividing it by a scaler lambda_i >= 1
at every evaluation pulls the trajectory back (Sec. 5, eq. 14):

    eps'(x, sigma) = eps(x, sigma) / lambda_i,   lambda_i = eps_scaler + kappa * i,

with i the sampling step (kappa != 0 is the step-dependent schedule that the discriminator-guided
variant SEDM-G++ uses; both evaluations of a Heun step share lambda_i). In terms of the denoiser,
eps = (x - D(x; sigma)) / sigma, so the scaled denoiser is

    D'(x; sigma) = x - (x - D(x; sigma)) / lambda_i.

`x` here is what the denoiser sees: the sample divided by the signal scale s(t). With EDM's
--scaling=vp the sampler state is x_state = s(t) x and the ODE direction is
    dx_state/dt = (sigma'/sigma + s'/s) x_state - sigma' s / sigma * D(x_state / s; sigma),
which uses D only through eps = (x_state / s - D) / sigma. Scaling that eps means
D' = x_state / s - (x_state / s - D) / lambda, which is what wrapping the denoiser gives. Every
evaluation goes through the wrapper: the Euler step and Heun's correction, in EDM's sampler and in
the generalized one. (How this differs from the EDM-ES code: docs/differences.md.)
"""

from training.sampling import denoisers

#----------------------------------------------------------------------------

def eps_scaler_at(step, eps_scaler=1.0, kappa=0.0):
    """lambda_i for sampling step i."""
    return eps_scaler + kappa * step

def check_eps_scaler(eps_scaler, kappa, num_steps):
    """ValueError with a readable reason unless every lambda_i of the run is positive."""
    if eps_scaler <= 0:
        raise ValueError(f'--eps_scaler must be positive (1 = off), got {eps_scaler}')
    last = eps_scaler_at(num_steps - 1, eps_scaler, kappa)
    if last <= 0:
        raise ValueError(f'--eps_scaler={eps_scaler} with --kappa={kappa} reaches {last:g} at step {num_steps - 1}; every scaler must be positive')

def with_epsilon_scaling(denoise, eps_scaler=1.0, kappa=0.0):
    """Wrap a denoiser (x, sigma, step) -> D so that its predicted noise is divided by lambda_i.

    Both evaluations of a step are scaled; the second order and the churn of `denoise` are kept
    (training/sampling/denoisers.py). With eps_scaler=1 and kappa=0 the denoiser itself is returned, so the
    sampler is bit-identical to the plain one.
    """
    if eps_scaler == 1 and kappa == 0:
        return denoise
    def scale(evaluate):
        def denoise_scaled(x, sigma, step):
            denoised = evaluate(x, sigma, step)
            return x - (x - denoised) / eps_scaler_at(step, eps_scaler, kappa)
        return denoise_scaled
    return denoisers.transformed(denoise, scale, f'epsilon_scaling(eps_scaler={eps_scaler!r}, kappa={kappa!r})')

#----------------------------------------------------------------------------

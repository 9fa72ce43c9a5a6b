"""What a denoiser is to the sampler, and the one place where the corrections are put together.

A denoiser has up to three parts, all of which the sampler (training/sampling/sampler.py) takes from it
explicitly:

  first_order(x, sigma, step) -> D   the evaluation at the start of a step (the Euler evaluation);
                                     calling the denoiser calls this part.
  second_order(x, sigma, step) -> D  the evaluation of Heun's 2nd-order correction; the same
                                     function as first_order unless a correction treats it apart
                                     (discriminator guidance leaves it unguided by default).
  churn(step, S_churn, S_noise)      optional per-sample stochastic churn: (S_churn, S_noise) as
                                     float64 tensors [N] for this step, or None for the sampler's
                                     own values (DG's boosting).

x is at noise level sigma without signal scaling, D is float64, sigma is a float64 scalar tensor
or one value per sample, and step is the index i of the sampling step. A plain callable is a
denoiser without a separate second order and without per-sample churn (`as_denoiser`).

Corrections are wrappers that return a new Denoiser and pass every part through: `transformed`
applies one function to both evaluations, `observed` watches them, so wrapping in any order keeps
the second order and the churn of what is inside. `layers` names what was wrapped, innermost
first; it describes the result, so that two places that build "the same" denoiser can be compared.

training.sampling.generation.compose builds the denoiser of a run from its corrections (network, epsilon
scaling, discriminator guidance, in SEDM-G++'s order); this module imports none of them, so every
correction can build on it.
"""

import torch

#----------------------------------------------------------------------------

class Denoiser:
    """A denoiser with explicit parts (see the module docstring)."""

    def __init__(self, first_order, second_order=None, churn=None, layers=('callable',)):
        self.first_order = first_order
        self.second_order = second_order if second_order is not None else first_order
        self.churn = churn
        self.layers = tuple(layers)

    def __call__(self, x, sigma, step):
        return self.first_order(x, sigma, step)

    def churn_at(self, step, S_churn, S_noise):
        """(S_churn, S_noise) for the sampler's churn before `step`: per-sample tensors [N] from
        the churn part, or the sampler's own scalars where there is none or it declines."""
        per_sample = self.churn(step, S_churn, S_noise) if self.churn is not None else None
        return per_sample if per_sample is not None else (S_churn, S_noise)

    def __repr__(self):
        return f'Denoiser({" -> ".join(self.layers)})'

def as_denoiser(denoise):
    """A Denoiser as it is, or a plain callable as one without second order or per-sample churn."""
    return denoise if isinstance(denoise, Denoiser) else Denoiser(denoise)

def transformed(denoise, wrap, layer):
    """`denoise` with both evaluations replaced by wrap(evaluation); its churn is kept.

    wrap maps a callable (x, sigma, step) -> D to another one. Where the two evaluations are the
    same function, so are the wrapped ones. `layer` names the wrapper (None: it adds no layer).
    """
    inner = as_denoiser(denoise)
    first = wrap(inner.first_order)
    second = first if inner.second_order is inner.first_order else wrap(inner.second_order)
    return Denoiser(first, second, inner.churn, inner.layers + ((layer,) if layer is not None else ()))

def observed(denoise, observe):
    """`denoise` with observe(x, sigma, step, denoised) called after every evaluation (both orders);
    results and parts unchanged. Observers are not layers: they do not change what is computed."""
    def wrap(evaluate):
        def evaluate_observed(x, sigma, step):
            denoised = evaluate(x, sigma, step)
            observe(x, sigma, step, denoised)
            return denoised
        return evaluate_observed
    return transformed(denoise, wrap, None)

#----------------------------------------------------------------------------

def network(net, class_labels=None):
    """The denoiser of a preconditioned network (VPPrecond, EDMPrecond, ...) or of any module with
    its interface net(x, sigma, class_labels) (the optimal and MoLRG denoisers)."""
    def denoise(x, sigma, step):
        return net(x, sigma, class_labels).to(torch.float64)
    return Denoiser(denoise, layers=(f'network({type(net).__name__})',))

#----------------------------------------------------------------------------

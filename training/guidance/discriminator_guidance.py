"""Discriminator guidance: Kim et al., "Refining Generative Process with Discriminator Guidance in
Score-based Diffusion Models" (ICML 2023), and its combination with epsilon scaling, SEDM-G++
("Mitigating Exposure Bias in Discriminator Guided Diffusion Models").

A discriminator d(x, t) trained to tell data (label 1) from the generator's samples (label 0),
both diffused to time t, estimates the log density ratio log r = log d / (1 - d) between the
true and the model's marginals. Adding its gradient to the model score corrects it (DG eq. 7):

    score'(x; sigma) = score(x; sigma) + w * grad_x log r(x; sigma).

With the EDM ODE direction dx/dsigma = -sigma * score this adds w * c / sigma, c = -sigma^2 grad log r,
which is the same as replacing the denoiser output D by D - w * c. So guidance is one more denoiser
wrapper. As in DG's sampler, only the first (Euler) evaluation of a Heun step is guided by
default (dg_weight_2nd_order = 0): the wrapper names the unguided denoiser as its `second_order`.

The discriminator works on the features of a frozen, noise-conditional ADM classifier and, like
it, in VP terms (beta_min 0.1, beta_max 20): EDM's sigma maps to VP time tau(sigma) and the input
to mean(tau) * x (DG's "unnormalized WVE to normalized VP"). At 64 px the ADM classifier was
trained on the cosine schedule, so the time it sees is the cosine-schedule time with the same
signal level. SEDM-G++ applies epsilon scaling to the network first and adds the guidance term
unscaled, i.e. guidance wraps the epsilon-scaled denoiser.
"""

import os

import numpy as np
import torch

from training.guidance import adm_encoder
from training.sampling import denoisers
from training.sampling import sampler as sampler_lib

#----------------------------------------------------------------------------
# The VP-SDE the classifier and discriminator were trained on.

VP_BETA_MIN = 0.1
VP_BETA_MAX = 20.0
COSINE_S = 0.008 # Nichol & Dhariwal's offset of the cosine schedule.

def vp_integral_beta(t):
    return 0.5 * t ** 2 * (VP_BETA_MAX - VP_BETA_MIN) + t * VP_BETA_MIN

def vp_marginal(t):
    """(mean, std) of x_t given x_0 under the VP-SDE: x_t = mean x_0 + std z."""
    log_mean = -0.5 * vp_integral_beta(t)
    return torch.exp(log_mean), torch.sqrt(1 - torch.exp(2 * log_mean))

def vp_time_from_sigma(sigma):
    """The VP time tau with std / mean = sigma (EDM's sigma): solves exp(integral beta) = 1 + sigma^2."""
    # log1p rather than the sampler's log(sigma^2 + 1): exact at small sigma, and what DG's times have always been here.
    return sampler_lib.vp_time_from_integral(torch.log1p(sigma ** 2), VP_BETA_MAX - VP_BETA_MIN, VP_BETA_MIN)

def cosine_time_from_linear(t):
    """The time of the cosine schedule (ADM's 64 px models) whose signal level sqrt(alpha_bar) equals the linear VP one at t."""
    f_0 = np.cos(COSINE_S / (1 + COSINE_S) * np.pi / 2) ** 2
    mean, _std = vp_marginal(t)
    return (1 + COSINE_S) * 2 / np.pi * torch.arccos(np.sqrt(f_0) * mean) - COSINE_S

def classifier_time(t, img_resolution):
    """The time input of the ADM classifier (and discriminator) for VP time t."""
    return cosine_time_from_linear(t) if img_resolution == 64 else t

#----------------------------------------------------------------------------
# Importance sampling of training times (DG Sec. 4, as in score-SDE's likelihood weighting):
# t has density proportional to beta(t) / std(t)^2 on [t_min, 1]. Its antiderivative is
# A(t) = log(exp(I(t)) - 1), I = integral of beta, so t = A^-1(A(t_min) + u (A(1) - A(t_min))).

def vp_importance_antiderivative(t):
    return torch.log(torch.expm1(vp_integral_beta(t)))

def sample_importance_time(num, t_min=1e-5, generator=None, device=None):
    """num float32 VP times drawn with density proportional to beta(t) / std(t)^2 on [t_min, 1].

    Drawn on `device` (default: the generator's), which is where the generator has to live.
    """
    device = torch.device(device) if device is not None else (generator.device if generator is not None else torch.device('cpu'))
    t_min = torch.tensor(t_min, dtype=torch.float64)
    a_min, a_max = vp_importance_antiderivative(t_min), vp_importance_antiderivative(torch.tensor(1.0, dtype=torch.float64))
    u = torch.rand(num, generator=generator, dtype=torch.float64, device=device)
    integral = torch.log1p(torch.exp(a_min + u * (a_max - a_min))) # I(t)
    t = sampler_lib.vp_time_from_integral(integral, VP_BETA_MAX - VP_BETA_MIN, VP_BETA_MIN)
    return t.to(torch.float32).to(device)

def importance_density(t, t_min=1e-5):
    """The normalized density of sample_importance_time at t (for tests and plots)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    beta = VP_BETA_MIN + t * (VP_BETA_MAX - VP_BETA_MIN)
    _mean, std = vp_marginal(t)
    z = vp_importance_antiderivative(torch.tensor(1.0, dtype=torch.float64)) - vp_importance_antiderivative(torch.tensor(t_min, dtype=torch.float64))
    return beta / std ** 2 / z

def diffuse(images, t, generator=None):
    """VP-perturbed images: mean(t) x + std(t) z for images in [-1, 1] and times t [N].

    z is drawn on the images' device, so `generator` must live there too (CUDA refuses a CPU one).
    """
    mean, std = vp_marginal(t.to(images.dtype))
    z = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return mean[:, None, None, None] * images + std[:, None, None, None] * z

#----------------------------------------------------------------------------

LOG_RATIO_LIMIT = float(np.log((1 - 1e-5) / 1e-5)) # DG clips d to [1e-5, 1 - 1e-5].

class DiscriminatorGuidance:
    """The log density ratio of a discriminator on frozen classifier features, and its gradient.

    Times outside [time_min, time_max] (VP time) are not guided. DG decides that for the whole batch
    from its smallest time; here it is decided per sample, which is the same when all samples share
    their noise level and keeps an image independent of its batch otherwise.
    """
    def __init__(self, classifier, discriminator, img_resolution, time_min=0.01, time_max=1.0):
        self.classifier = classifier.eval().requires_grad_(False)
        self.discriminator = discriminator.eval().requires_grad_(False)
        self.img_resolution = img_resolution
        self.time_min = time_min
        self.time_max = time_max
        self.dtype = next(discriminator.parameters()).dtype

    def to(self, device):
        self.classifier.to(device)
        self.discriminator.to(device)
        return self

    def log_ratio_vp(self, x_vp, t, class_labels=None):
        """log d / (1 - d) for VP inputs x_vp at VP times t [N], clamped as DG clamps d."""
        t_in = classifier_time(t, self.img_resolution).to(self.dtype)
        features = self.classifier.features(x_vp, t_in)
        logits = self.discriminator(features, t_in, class_labels if self.discriminator.num_classes else None)
        # log(d / (1 - d)) of d = sigmoid(logit) is the logit itself; clamping it is DG's clip of d
        # without the rounding of the sigmoid near 0 and 1.
        return logits.reshape(-1).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)

    def log_ratio(self, x, sigma, class_labels=None):
        """log r for x at EDM noise level sigma (a scalar or one per sample)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        t = vp_time_from_sigma(sigma)
        mean, _std = vp_marginal(t)
        return self.log_ratio_vp((mean[:, None, None, None] * x).to(self.dtype), t, class_labels)

    def correction(self, x, sigma, class_labels=None):
        """(c, log r): c = -sigma^2 grad_x log r(x; sigma) in x's dtype, zero outside the time window.

        log r is +inf where a sample is not guided (so that boosting leaves it alone, as DG's 1e7).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        t = vp_time_from_sigma(sigma)
        active = (t >= self.time_min) & (t <= self.time_max)
        c = torch.zeros_like(x)
        log_r = torch.full([x.shape[0]], float('inf'), dtype=torch.float64, device=x.device)
        if not active.any():
            return c, log_r
        idx = active.nonzero()[:, 0]
        with torch.enable_grad():
            x_active = x[idx].detach().to(self.dtype).requires_grad_(True)
            labels = class_labels[idx] if class_labels is not None else None
            value = self.log_ratio(x_active, sigma[idx], labels)
            grad, = torch.autograd.grad(value.sum(), x_active)
        c[idx] = -(sigma[idx, None, None, None] ** 2) * grad.to(x.dtype)
        log_r[idx] = value.detach().to(torch.float64)
        return c, log_r

#----------------------------------------------------------------------------

class Boosting:
    """DG's boosting: samples the discriminator finds unrealistic (log r < 0) get twice the guidance
    on even steps, and extra churn (S_churn = 4) at every 5th step, from the last log r seen."""
    WEIGHT_PERIOD = 2
    CHURN_PERIOD = 5
    S_CHURN = 4.0

    def __init__(self):
        self.last_log_ratio = None

    def weight_factor(self, step, log_ratio):
        self.last_log_ratio = log_ratio
        boost = (log_ratio < 0) & (step % self.WEIGHT_PERIOD == 0)
        return torch.where(boost, 2.0, 1.0).to(torch.float64)

    def churn_mask(self, step):
        """Which samples get boosted churn before this step (none before the first evaluation)."""
        if step % self.CHURN_PERIOD != 0 or self.last_log_ratio is None:
            return None
        return self.last_log_ratio < 0

    def churn(self, step, S_churn, S_noise):
        """Per-sample (S_churn, S_noise) for the sampler's churn of this step, or None for the usual churn."""
        mask = self.churn_mask(step)
        if mask is None or not mask.any():
            return None
        return (torch.where(mask, self.S_CHURN, float(S_churn)).to(torch.float64),
            torch.where(mask, 1.0, float(S_noise)).to(torch.float64))

def with_discriminator_guidance(denoise, guidance, class_labels=None, weight_1st_order=1.0, weight_2nd_order=0.0, boosting=None):
    """Wrap a denoiser (x, sigma, step) -> D so that its Euler evaluations return D - w c (see above).

    A training.sampling.denoisers.Denoiser: its second order is the 2nd-order evaluation of `denoise`,
    unguided unless weight_2nd_order != 0, and with `boosting` its churn is the boosting's per-sample
    churn. weight_1st_order = weight_2nd_order = 0 returns `denoise` itself.
    """
    if weight_1st_order == 0 and weight_2nd_order == 0:
        return denoise
    inner = denoisers.as_denoiser(denoise)
    if boosting is not None and inner.churn is not None:
        raise ValueError('boosting adds per-sample churn to a denoiser that already has its own')
    def guided(evaluate, weight, use_boosting):
        def denoise_guided(x, sigma, step):
            denoised = evaluate(x, sigma, step)
            c, log_r = guidance.correction(x, sigma, class_labels)
            w = torch.full([x.shape[0]], float(weight), dtype=torch.float64, device=x.device)
            if use_boosting and boosting is not None:
                w = w * boosting.weight_factor(step, log_r).to(x.device)
            return denoised - w.to(x.dtype)[:, None, None, None] * c
        return denoise_guided
    first = guided(inner.first_order, weight_1st_order, True) if weight_1st_order != 0 else (lambda x, sigma, step: inner.first_order(x, sigma, step))
    second = guided(inner.second_order, weight_2nd_order, False) if weight_2nd_order != 0 else inner.second_order
    layer = f'discriminator_guidance(weight_1st_order={weight_1st_order!r}, weight_2nd_order={weight_2nd_order!r}, boosting={boosting is not None})'
    return denoisers.Denoiser(first, second, boosting.churn if boosting is not None else inner.churn, inner.layers + (layer,))

#----------------------------------------------------------------------------
# Checkpoints: plain state dicts in guided-diffusion's layout (`32x32_classifier.pt`,
# `discriminator_*.pt`); the layout is read back from the keys and shapes.

class GuidanceCheckpointError(Exception):
    """A classifier or discriminator file that cannot be used; the message is meant for the user."""

def load_state_dict_file(path, what):
    if not os.path.isfile(path):
        raise GuidanceCheckpointError(f'{what} file not found: {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise GuidanceCheckpointError(f'{path} is not a readable {what} state dict ({type(e).__name__}: {e})') from e
    if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GuidanceCheckpointError(f'{path} does not hold a {what} state dict (a dict of tensors)')
    return state

def input_channels(state):
    weight = state.get('input_blocks.0.0.weight')
    return weight.shape[1] if weight is not None and weight.ndim == 4 else None

def build_encoder(state, img_resolution, path, what):
    """An EncoderUNet holding `state` (strict), in eval mode without gradients."""
    try:
        kwargs = adm_encoder.infer_kwargs(state, img_resolution)
        with torch.device('meta'):
            net = adm_encoder.EncoderUNet(**kwargs)
    except (ValueError, AssertionError, KeyError, IndexError) as e:
        raise GuidanceCheckpointError(f'{path} is not a usable {what}: {e}') from e
    mismatch = adm_encoder.describe_mismatch(net, state)
    if mismatch:
        raise GuidanceCheckpointError(f'{path} does not match the {what} layout it claims: {mismatch}')
    net = net.to_empty(device='cpu')
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)

def load_classifier(path, img_resolution, img_channels):
    """The ADM feature extractor for img_resolution x img_resolution images with img_channels channels."""
    state = load_state_dict_file(path, 'classifier')
    channels = input_channels(state)
    if channels is not None and channels != img_channels:
        raise GuidanceCheckpointError(f'{path} takes {channels}-channel input (input_blocks.0.0.weight), but the images have {img_channels} channels'
            + ('; is it a discriminator? pass it as --discriminator_ckpt' if channels == 512 else ''))
    return build_encoder(state, img_resolution, path, 'ADM classifier')

def load_discriminator(path, classifier, cond):
    """The discriminator head on `classifier`'s features; `cond` must say whether it has a class embedding."""
    state = load_state_dict_file(path, 'discriminator')
    channels = input_channels(state)
    if channels is not None and channels != classifier.feature_channels:
        raise GuidanceCheckpointError(f'{path} takes {channels}-channel features (input_blocks.0.0.weight), but the classifier gives '
            f'{classifier.feature_channels}' + ('; is it the classifier? pass it as --pretrained_classifier_ckpt' if channels in (1, 3) else ''))
    net = build_encoder(state, classifier.feature_resolution, path, 'discriminator')
    if net.out[2].c_proj.out_channels != 1:
        raise GuidanceCheckpointError(f'{path} has {net.out[2].c_proj.out_channels} outputs (out.2.c_proj.weight); a discriminator has 1')
    if bool(net.num_classes) != bool(cond):
        raise GuidanceCheckpointError(f'{path} is a class-conditional discriminator (it has label_emb.weight); pass --cond=1' if net.num_classes
            else f'--cond=1 given, but {path} is an unconditional discriminator (no label_emb.weight)')
    return net

#----------------------------------------------------------------------------

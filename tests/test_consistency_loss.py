"""The CDM loss: EDM's loss plus a martingale term that vanishes for consistent denoisers."""

import torch

from conftest import make_tiny_net
from training import loss as loss_lib
from training.augment import AugmentPipe

#----------------------------------------------------------------------------

def test_zero_lambda_is_exactly_the_edm_loss_for_the_same_random_draws():
    net = make_tiny_net(label_dim=3, augment_dim=9).train()
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    labels = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    pipe = AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    losses = []
    for loss_fn in [loss_lib.EDMLoss(), loss_lib.MartingaleLoss(martingale_lambda=0)]:
        torch.manual_seed(7)
        losses.append(loss_fn(net=net, images=images, labels=labels, augment_pipe=pipe))
    assert torch.equal(losses[0], losses[1])

def test_martingale_term_runs_unconditionally_and_without_augmentation():
    net = make_tiny_net()
    loss = loss_lib.MartingaleLoss(martingale_lambda=2, num_steps=3)(net=net, images=torch.zeros(2, 3, 8, 8))
    assert loss.shape == (2, 3, 8, 8) and torch.isfinite(loss).all() # The original crashes on both.

#----------------------------------------------------------------------------
# For data N(0, c^2 I) the exact denoiser D(x; s) = c^2 / (c^2 + s^2) x is consistent: along the
# reverse SDE, E[D(x_s; s) | x_t] = D(x_t; t). Scaling it by a factor that changes with the noise
# level breaks that, and the martingale term's expectation becomes positive. Here the inconsistent
# denoiser adds a constant image that grows with the noise level: its prediction at s_min then
# differs from its prediction at sigma by about inconsistency * (sigma - s_min) per pixel.

class GaussianDenoiser:
    def __init__(self, c=0.5, inconsistency=0.0):
        self.c, self.inconsistency = c, inconsistency

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        denoised = self.c ** 2 / (self.c ** 2 + sigma ** 2) * x.to(torch.float64) + self.inconsistency * sigma
        return denoised.to(torch.float32)

def mean_martingale_term(denoiser, sigma=1.0, n=4000, seed=0):
    torch.manual_seed(seed)
    loss_fn = loss_lib.MartingaleLoss(num_steps=6, epsilon_min=0.05, epsilon_max=0.05) # Fixed 0.05 below sigma.
    y = torch.randn(n, 1, 4, 4) * denoiser.c
    sigma = torch.full([n, 1, 1, 1], sigma)
    x_t = y + torch.randn_like(y) * sigma
    with torch.no_grad():
        term = loss_fn.martingale_term(denoiser, x_t, sigma, denoiser(x_t, sigma))
    return float(term.mean()), float(term.abs().mean())

def test_martingale_term_is_unbiased_zero_for_a_consistent_denoiser_and_positive_otherwise():
    consistent_mean, consistent_scale = mean_martingale_term(GaussianDenoiser())
    inconsistent_mean, _ = mean_martingale_term(GaussianDenoiser(inconsistency=2.0))
    assert abs(consistent_mean) < 0.02 * consistent_scale # Zero within sampling and discretization error.
    assert inconsistent_mean > 10 * abs(consistent_mean) and inconsistent_mean > 0.05 * consistent_scale

#----------------------------------------------------------------------------

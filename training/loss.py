"""Training losses: VP, VE and EDM denoising score matching, and the consistency (martingale)
regularization of Daras et al., "Consistent Diffusion Models" (NeurIPS 2023).

Every loss returns the per-element loss [N, C, H, W]; the training loop sums it. Losses are pickled
into snapshots as `loss_fn`, and NVIDIA EDM executes this module's source when it loads such a
snapshot, so it may import nothing but numpy, torch and torch_utils.persistence.
"""

import torch

from torch_utils import persistence
from torch_utils import training_stats

#----------------------------------------------------------------------------
# Denoising score matching at a noise level drawn per sample (EDM Table 1):
# loss = weight(sigma) * ||D(y + n; sigma) - y||^2 with y the (augmented) image.

def _denoising_loss(net, images, labels, augment_pipe, sigma, weight):
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)

@persistence.persistent_class
class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d        # Extent of the VP noise schedule.
        self.beta_min = beta_min    # Initial slope of the VP noise schedule.
        self.epsilon_t = epsilon_t  # Smallest t drawn.

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight=1 / sigma ** 2)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

@persistence.persistent_class
class VELoss:
    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min  # Smallest noise level drawn.
        self.sigma_max = sigma_max  # Largest noise level drawn (log-uniform in between).

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight=1 / sigma ** 2)

@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean            # Mean of ln(sigma).
        self.P_std = P_std              # Standard deviation of ln(sigma).
        self.sigma_data = sigma_data    # Standard deviation of the data.

    def draw_sigma(self, images):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = self.draw_sigma(images)
        return _denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

#----------------------------------------------------------------------------
# Consistency regularization (Daras et al. 2023, Sec. 3-4). A consistent
# denoiser is a martingale along the reverse process: the expected denoised
# image at a lower noise level, over trajectories from x_t, equals D(x_t; t).
# With x1, x2 the ends of two independent reverse-SDE trajectories from
# x_t = y + n (sigma) down to s_min = max(sigma - eps, 0.002), the product
#     (D(x1; s_min) - D(x_t; sigma)) * (D(x2; s_min) - D(x_t; sigma))
# has expectation ||E[D(x1; s_min)] - D(x_t; sigma)||^2 >= 0, zero exactly for
# a consistent denoiser, and it is unbiased with only two trajectories.

def edm_noise_levels(sigma_max, sigma_min, num_levels, rho=7):
    """Per-sample EDM discretization (EDM eq. 5) between sigma_max and sigma_min: [N, 1, 1, 1, num_levels]."""
    i = torch.arange(num_levels, dtype=torch.float64, device=sigma_max.device)
    s_max = sigma_max.to(torch.float64)[..., None] ** (1 / rho)
    s_min = sigma_min.to(torch.float64)[..., None] ** (1 / rho)
    return (s_max + i / (num_levels - 1) * (s_min - s_max)) ** rho

def reverse_sde_step(net, x, sigma_cur, sigma_next, labels, augment_labels):
    """One Euler-Maruyama step of the reverse SDE for sigma(t) = t (EDM eq. 6 with beta = 1):
    dx = 2 (x - D(x; sigma)) / sigma dsigma + sqrt(2 sigma |dsigma|) * noise."""
    d = (x - net(x, sigma_cur, labels, augment_labels=augment_labels).to(torch.float64)) / sigma_cur
    return x + 2 * (sigma_next - sigma_cur) * d + (2 * (sigma_cur - sigma_next).abs() * sigma_cur).sqrt() * torch.randn_like(x)

@persistence.persistent_class
class MartingaleLoss(EDMLoss):
    def __init__(self,
        P_mean              = -1.2,     # Mean of ln(sigma), as EDMLoss.
        P_std               = 1.2,      # Standard deviation of ln(sigma), as EDMLoss.
        sigma_data          = 0.5,      # Standard deviation of the data, as EDMLoss.
        martingale_lambda   = 10.0,     # Weight of the consistency term.
        num_steps           = 6,        # Noise levels of each trajectory (num_steps - 1 SDE steps, as the original).
        epsilon_min         = 0.0,      # How far below sigma the trajectories end: eps ~ U[epsilon_min, epsilon_max].
        epsilon_max         = 0.05,
        rho                 = 7,        # Exponent of the trajectories' EDM discretization.
        sigma_floor         = 0.002,    # Trajectories never end below this noise level.
        S_churn             = 10.0,     # Recorded for compatibility with the original's options; like there,
        S_min               = 0.01,     # they do not enter the loss (its reverse SDE carries its own noise).
        S_max               = 1.0,
        S_noise             = 1.007,
    ):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        assert num_steps >= 2, 'a trajectory needs at least 2 noise levels'
        self.martingale_lambda = martingale_lambda
        self.num_steps = num_steps
        self.epsilon_min = epsilon_min
        self.epsilon_max = epsilon_max
        self.rho = rho
        self.sigma_floor = sigma_floor
        self.S_churn, self.S_min, self.S_max, self.S_noise = S_churn, S_min, S_max, S_noise

    def __call__(self, net, images, labels=None, augment_pipe=None):
        # The EDM loss, with the same random draws in the same order as EDMLoss, so that
        # martingale_lambda=0 gives exactly EDMLoss. (The original draws the augmentation and
        # the noise twice and throws the first draw away.)
        sigma = self.draw_sigma(images)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        loss = self.weight(sigma) * ((D_yn - y) ** 2)
        if self.martingale_lambda == 0:
            return loss
        martingale = self.martingale_lambda * self.martingale_term(net, y + n, sigma, D_yn, labels, augment_labels)
        # The two parts in stats.jsonl beside Loss/loss (their sum), to see which one training reduces.
        training_stats.report('Loss/denoising', loss)
        training_stats.report('Loss/martingale', martingale)
        return loss + martingale

    def martingale_term(self, net, x_t, sigma, D_t, labels=None, augment_labels=None):
        """(D(x1; s_min) - D_t) * (D(x2; s_min) - D_t) per element; gradients flow into both
        denoiser outputs, not through the trajectories (run without gradient, as the original)."""
        epsilon = self.epsilon_min + torch.rand_like(sigma) * (self.epsilon_max - self.epsilon_min)
        sigma_min = torch.maximum(sigma - epsilon, torch.full_like(sigma, self.sigma_floor))
        levels = edm_noise_levels(sigma, sigma_min, self.num_steps, self.rho).repeat([2, 1, 1, 1, 1])

        # Both trajectories in one batch: labels and augmentation labels are repeated with them.
        # The original calls labels.repeat() unconditionally, which crashes for unconditional
        # networks (labels None) and without augmentation (augment_labels None); it also leaves the
        # augmentation labels out of the trajectory steps. Here they are passed where they exist.
        twice = lambda t: t.repeat([2] + [1] * (t.ndim - 1)) if t is not None else None
        labels2, augment_labels2 = twice(labels), twice(augment_labels)
        x = twice(x_t).detach().to(torch.float64)
        with torch.no_grad():
            for i in range(self.num_steps - 1):
                x = reverse_sde_step(net, x, levels[..., i], levels[..., i + 1], labels2, augment_labels2)
        D_end = net(x.to(torch.float32), twice(sigma_min), labels2, augment_labels=augment_labels2)
        x1, x2 = D_end.chunk(2)
        return (x1 - D_t) * (x2 - D_t)

#----------------------------------------------------------------------------

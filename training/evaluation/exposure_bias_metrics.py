"""Measuring exposure bias, and choosing the epsilon scaler from the measurement.

Ning et al. ("Elucidating the Exposure Bias in Diffusion Models", Fig. 6) compare, at every step
of a sampler, the L2 norm of the predicted noise eps = (x - D(x; sigma)) / sigma in two settings:

  consecutive -- x_t comes from the sampler's own previous steps, as in generation;
  single step -- x_t = y + sigma n is a training image noised to the same sigma, as in training.

The consecutive norm exceeds the single-step one: the network sees inputs it was not trained on.
Alongside, the variance error compares the variance of the sampled x_t with that of training
inputs at the same sigma (both the mean over samples of the variance of one sample's C*H*W values,
x in EDM scaling x = y + sigma n): variance_error = Var(sampled) / Var(training) - 1.

Calibration: epsilon scaling divides eps by lambda_i, so the
scaler that makes the sampling norm equal the single-step norm at step i is
r_i = consecutive_i / single_step_i. A constant scaler and a linear schedule lambda_i = a + kappa i
are least-squares fits of r_i, weighted so that steps count by their single-step norm:

    constant: lambda = sum(c_i^2) / sum(c_i s_i)            (minimizes sum (c_i / lambda - s_i)^2)
    linear:   (a, kappa) = argmin sum s_i^2 (r_i - a - kappa i)^2.

Scaling changes the trajectory and with it the consecutive norms, so `calibrate` re-measures with
the fitted scaler and takes secant steps towards the root of the residual h (see calibrate()); it
reports the residual |h| of the scaler it returns and whether that is within tolerance, so that a
calibration cut short by too few rounds is not taken for a converged one.
"""

import json
import os

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import misc
from training import dataset
from training.sampling import epsilon_scaling
from training.sampling import generation
from training.sampling import sampler as sampler_lib

#----------------------------------------------------------------------------

class StepRecorder:
    """Watches a denoiser; at the first evaluation of every sampling step records the mean L2 norm of
    the predicted noise and the mean per-sample variance of x, summed over all batches.

    `observe` is the hook for training.sampling.denoisers.observed (generation.compose's observe_network);
    calling the recorder as a denoiser evaluates and observes `denoise`.
    """

    def __init__(self, denoise=None):
        self.denoise = denoise
        self.eps_norm_sum = {}
        self.variance_sum = {}
        self.count = {}
        self._last_step = None

    def observe(self, x, sigma, step, denoised):
        if step != self._last_step: # The Euler evaluation; a Heun correction of the same step is not recorded.
            eps = (x - denoised) / torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
            self.eps_norm_sum[step] = self.eps_norm_sum.get(step, 0.0) + float(eps.flatten(1).norm(dim=1).sum())
            self.variance_sum[step] = self.variance_sum.get(step, 0.0) + float(x.flatten(1).var(dim=1).sum())
            self.count[step] = self.count.get(step, 0) + x.shape[0]
        self._last_step = step

    def __call__(self, x, sigma, step):
        denoised = self.denoise(x, sigma, step)
        self.observe(x, sigma, step, denoised)
        return denoised

    def new_batch(self):
        self._last_step = None

    def means(self):
        steps = sorted(self.count)
        return (np.array([self.eps_norm_sum[i] / self.count[i] for i in steps]),
                np.array([self.variance_sum[i] / self.count[i] for i in steps]))

def sampler_sigmas(net, sampler_kwargs):
    """The noise level of the first evaluation of each step of the configured sampler."""
    return sampler_lib.plan_from_settings(net, sampler_kwargs).sigma_steps

#----------------------------------------------------------------------------

def consecutive_statistics(net, seeds, sampler_kwargs, eps_scaler=1.0, kappa=0.0, batch_size=64, device=torch.device('cpu'), progress=None):
    """Per step: mean eps norm of the network along real sampling trajectories, and mean variance of x.

    The recorded eps is the network's own, before epsilon scaling; the trajectories follow the
    scaled sampler, as they would in generation. `progress`: a tqdm description to show a bar per batch.
    """
    corrections = generation.Corrections(eps_scaler=eps_scaler, kappa=kappa)
    recorder = StepRecorder()
    batches = generation.rank_batches(seeds, batch_size)
    for batch_seeds in tqdm.tqdm(batches, desc=progress, unit='batch', leave=False, disable=(progress is None)):
        rnd = sampler_lib.StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        labels = generation.class_labels_for_seeds(net, rnd, len(batch_seeds), device=device)
        denoise = generation.compose(net, labels, corrections, observe_network=recorder.observe)
        recorder.new_batch()
        with torch.no_grad():
            sampler_lib.run_settings(net, latents, labels, randn_like=rnd.randn_like, denoise=denoise, sampler_kwargs=sampler_kwargs)
    return recorder.means()

def load_training_images(path, net, num):
    """Up to `num` uint8 images of the dataset at `path` (a seeded subset, always the same) and
    their one-hot labels when the network is conditional; DatasetError when they do not fit `net`."""
    data = dataset.ImageFolderDataset(path, use_labels=bool(net.label_dim), max_size=num, random_seed=0)
    if (data.resolution, data.num_channels) != (net.img_resolution, net.img_channels):
        raise dataset.DatasetError(f'--data has {data.num_channels}x{data.resolution}x{data.resolution} images, '
            f'the network {net.img_channels}x{net.img_resolution}x{net.img_resolution}')
    if net.label_dim and data.label_dim != net.label_dim:
        raise dataset.DatasetError(f'--data has {data.label_dim} classes, the network {net.label_dim}')
    items = [data[i] for i in range(len(data))]
    images = np.stack([image for image, _ in items])
    labels = np.stack([label for _, label in items]) if net.label_dim else None
    return images, labels

def single_step_statistics(net, images, labels, sigmas, seed=0, batch_size=256, progress=None):
    """Per noise level: mean eps norm on training images noised to it, and mean variance of those inputs.

    images: uint8 NCHW; labels: float one-hot [N, label_dim] or None. `progress`: a tqdm description
    to show a bar per noise level.
    """
    device = misc.module_device(net)
    generator = torch.Generator().manual_seed(seed)
    norms, variances = [], []
    for sigma in tqdm.tqdm(sigmas, desc=progress, unit='step', leave=False, disable=(progress is None)):
        norm_sum, variance_sum = 0.0, 0.0
        for start in range(0, len(images), batch_size):
            y = misc.uint8_to_model_range(torch.as_tensor(images[start:start + batch_size]), torch.float64)
            n = torch.randn(y.shape, generator=generator, dtype=torch.float64)
            x = (y + float(sigma) * n).to(device)
            batch_labels = torch.as_tensor(labels[start:start + batch_size]).to(device) if labels is not None else None
            with torch.no_grad():
                denoised = net(x, torch.as_tensor(float(sigma), dtype=torch.float64, device=device), batch_labels).to(torch.float64)
            eps = (x - denoised) / float(sigma)
            norm_sum += float(eps.flatten(1).norm(dim=1).sum())
            variance_sum += float(x.flatten(1).var(dim=1).sum())
        norms.append(norm_sum / len(images))
        variances.append(variance_sum / len(images))
    return np.array(norms), np.array(variances)

#----------------------------------------------------------------------------

def fit_constant_scaler(consecutive, single_step):
    c, s = np.asarray(consecutive, dtype=np.float64), np.asarray(single_step, dtype=np.float64)
    return float((c ** 2).sum() / (c * s).sum())

def fit_linear_scaler(consecutive, single_step):
    """(eps_scaler, kappa) of the weighted least-squares line through r_i = c_i / s_i."""
    c, s = np.asarray(consecutive, dtype=np.float64), np.asarray(single_step, dtype=np.float64)
    steps = np.arange(len(c), dtype=np.float64)
    if len(c) < 2:
        return fit_constant_scaler(c, s), 0.0
    w = s ** 2
    A = np.stack([np.ones_like(steps), steps], axis=1) * np.sqrt(w)[:, None]
    (a, kappa), *_ = np.linalg.lstsq(A, (c / s) * np.sqrt(w), rcond=None)
    return float(a), float(kappa)

#----------------------------------------------------------------------------

def curves(sigmas, consecutive, sampled_variance, single_step, training_variance, eps_scaler=1.0, kappa=0.0):
    """Both curves and the variance error as a dict of lists (what measure() returns)."""
    scalers = np.array([epsilon_scaling.eps_scaler_at(i, eps_scaler, kappa) for i in range(len(sigmas))])
    return dict(
        step=list(range(len(sigmas))), sigma=sigmas.tolist(),
        eps_norm_consecutive=consecutive.tolist(), eps_norm_single_step=single_step.tolist(),
        eps_norm_consecutive_scaled=(consecutive / scalers).tolist(), # What the sampler actually uses.
        variance_sampled=sampled_variance.tolist(), variance_training=training_variance.tolist(),
        variance_error=(sampled_variance / training_variance - 1).tolist(),
        eps_scaler=eps_scaler, kappa=kappa,
    )

def measure(net, images, labels, seeds, sampler_kwargs, eps_scaler=1.0, kappa=0.0, batch_size=64, device=torch.device('cpu'), progress=False):
    """Both curves and the variance error for one sampler setting, as a dict of lists."""
    sigmas = sampler_sigmas(net, sampler_kwargs).cpu().numpy()
    consecutive, sampled_variance = consecutive_statistics(net, seeds, sampler_kwargs, eps_scaler, kappa, batch_size, device,
        progress=('sampling trajectories' if progress else None))
    single_step, training_variance = single_step_statistics(net, images, labels, sigmas, progress=('noised training images' if progress else None))
    return curves(sigmas, consecutive, sampled_variance, single_step, training_variance, eps_scaler, kappa)

CONVERGENCE_TOLERANCE = 1e-3 # On |h|, a relative error of the fit; near the root dh/dl is of order 1-5, so the scaler is within ~1e-3 or better.

def calibrate(net, images, labels, seeds, sampler_kwargs, rounds=3, batch_size=64, device=torch.device('cpu'), progress=None,
    tolerance=CONVERGENCE_TOLERANCE, progress_bars=False):
    """Fit the constant and the linear scaler by repeated measurement.

    Returns (result dict, history, measured): `measured` holds the curves (as measure() gives them)
    at eps_scaler 1 and at the calibrated scaler, which calibration has measured anyway. The result
    dict holds eps_scaler, its residual h, `converged` (|h| <= tolerance) and the linear schedule;
    a calibration that has not converged is still the best scaler measured, not a calibrated one.

    The constant scaler is the root of h(l) = log fit(c(l)) - log l, where c(l) are the network's
    raw eps norms along trajectories sampled with scaler l and fit() is fit_constant_scaler against
    the single-step norms (which do not depend on l): at the root, the scaled norms c(l) / l match
    the single-step norms in the least-squares sense. Each round measures c at the current estimate
    and takes a secant step (the first round takes l = fit(c(1))). A plain fixed-point iteration
    l <- fit(c(l)) is not enough: scaling feeds back into the trajectories, and when that feedback
    is strong (a scaler below 1 makes the sampler remove more noise, so the network then predicts
    smaller noise, so the next fit is lower still) it runs away instead of converging.

    The result is the measured scaler with the smallest |h|. The linear schedule (eps_scaler, kappa)
    is fitted to the raw norms along its trajectories: it keeps the per-step trend around the
    calibrated level.
    """
    sigmas = sampler_sigmas(net, sampler_kwargs).cpu().numpy()
    single_step, training_variance = single_step_statistics(net, images, labels, sigmas, progress=('noised training images' if progress_bars else None))
    def residual(scaler):
        consecutive, sampled_variance = consecutive_statistics(net, seeds, sampler_kwargs, scaler, 0.0, batch_size, device,
            progress=(f'trajectories at eps_scaler {scaler:.5f}' if progress_bars else None))
        h = float(np.log(fit_constant_scaler(consecutive, single_step)) - np.log(scaler))
        return h, curves(sigmas, consecutive, sampled_variance, single_step, training_variance, scaler)

    history = []
    points = [(1.0, *residual(1.0))] # (scaler, h, curves)
    for round_idx in range(rounds):
        (l0, h0, _), (l1, h1, _) = (points[-2] if len(points) > 1 else (None, None, None)), points[-1]
        if l0 is None or h1 == h0:
            estimate = l1 * np.exp(h1) # The fixed-point step, l <- fit(c(l)).
        else:
            estimate = l1 - h1 * (l1 - l0) / (h1 - h0)
        estimate = float(np.clip(estimate, l1 / 1.25, l1 * 1.25)) # A measurement far outside its neighbourhood says little.
        points.append((estimate, *residual(estimate)))
        linear = fit_linear_scaler(points[-1][2]['eps_norm_consecutive'], single_step)
        history.append(dict(round=round_idx, constant=estimate, residual=points[-1][1], linear=list(linear)))
        if progress is not None:
            progress(history[-1])
    best = min(points, key=lambda point: abs(point[1]))
    linear = fit_linear_scaler(best[2]['eps_norm_consecutive'], single_step)
    fitted = dict(eps_scaler=best[0], residual=best[1], converged=bool(abs(best[1]) <= tolerance), tolerance=tolerance,
        linear_eps_scaler=linear[0], linear_kappa=linear[1])
    return fitted, history, dict(plain=points[0][2], calibrated=best[2])

#----------------------------------------------------------------------------

def describe_calibration(fitted):
    """One line: the scaler, its residual, and whether the calibration converged."""
    if fitted['converged']:
        return f'calibrated eps_scaler {fitted["eps_scaler"]:.5f} (converged: |h| = {abs(fitted["residual"]):.2e} <= {fitted["tolerance"]:.0e})'
    return (f'calibration did NOT converge: best eps_scaler measured {fitted["eps_scaler"]:.5f} has |h| = {abs(fitted["residual"]):.2e} '
        f'> {fitted["tolerance"]:.0e}; run more --rounds')

def save_curves(result, outdir, name='eps_norm'):
    """JSON and CSV of a measure() result, written atomically."""
    with dnnlib.util.atomic_write(os.path.join(outdir, f'{name}.json'), mode='w') as f:
        json.dump(result, f, indent=2)
    columns = ['step', 'sigma', 'eps_norm_consecutive', 'eps_norm_consecutive_scaled', 'eps_norm_single_step', 'variance_sampled', 'variance_training', 'variance_error']
    with dnnlib.util.atomic_write(os.path.join(outdir, f'{name}.csv'), mode='w') as f:
        f.write(','.join(columns) + '\n')
        for row in zip(*[result[c] for c in columns]):
            f.write(','.join(f'{v:.8g}' for v in row) + '\n')

def plot_curves(curves, path, title=''):
    """PNG of eps norms (consecutive, after scaling, vs single step) and the variance error.

    `curves` is {label: measure() result}; every result adds its consecutive curve, the first its
    single-step curve.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_norm, ax_var) = plt.subplots(1, 2, figsize=(11, 4))
    first = next(iter(curves.values()))
    ax_norm.plot(first['step'], first['eps_norm_single_step'], 'k--', label='single step (training inputs)')
    for label, result in curves.items():
        ax_norm.plot(result['step'], result['eps_norm_consecutive_scaled'], marker='.', label=f'consecutive sampling, {label}')
        ax_var.plot(result['step'], np.array(result['variance_error']) * 100, marker='.', label=label)
    ax_norm.set_xlabel('sampling step i (noise decreasing)')
    ax_norm.set_ylabel('mean ||eps||_2 (after scaling)')
    ax_norm.legend(fontsize=8)
    ax_var.axhline(0, color='k', linewidth=0.5)
    ax_var.set_xlabel('sampling step i')
    ax_var.set_ylabel('variance error [%]')
    ax_var.set_title('Var(sampled x) / Var(training x) - 1', fontsize=9)
    ax_var.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=110)
    plt.close(fig)

#----------------------------------------------------------------------------

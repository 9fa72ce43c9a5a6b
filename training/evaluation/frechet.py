"""Feature statistics and the Frechet distance between two Gaussians, as FID uses them.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Heusel et al. 2017, eq. 6).

Only the trace of the square root is needed, and it equals the sum of square roots of the
eigenvalues of a SYMMETRIC positive semi-definite matrix: with S1 = F F^T,

    eig(S1 S2) = eig(F F^T S2) = eig(F^T S2 F)   (plus zeros),

so tr((S1 S2)^(1/2)) = sum_i sqrt(max(lambda_i(F^T S2 F), 0)). F is the Cholesky factor when S1 is
positive definite, or V diag(sqrt(lambda)) from an eigen-decomposition when it is singular. Every
step is a backward-stable symmetric routine, so the result is real by construction, also for
rank-deficient covariances (fewer images than feature dimensions, a collapsed model), and it takes
about 1 s at d=2048 (benchmarks/frechet_distance.py; docs/differences.md compares it with the
scipy.linalg.sqrtm route).
"""

import os

import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import dataset as dataset_lib
from training.evaluation import feature_detectors

#----------------------------------------------------------------------------

def few_images_warning(num_images, feature_dim=2048):
    """A one-line warning if there are fewer images than feature dimensions, else None.

    Below that the covariance is rank-deficient and FID is strongly biased upwards (its bias
    shrinks like feature_dim / num_images). For Inception features that is 2048 images; EDM and
    the FID literature use 50000.
    """
    if num_images >= feature_dim:
        return None
    return (f'Warning: statistics of only {num_images} images; FID from fewer images than the {feature_dim} feature dimensions '
        f'is biased upwards and not comparable with published numbers (those use 50000)')

#----------------------------------------------------------------------------

def _symmetric(matrix):
    matrix = np.asarray(matrix, dtype=np.float64)
    return (matrix + matrix.T) * 0.5

def cholesky_factor(sigma):
    """Lower-triangular L with sigma = L L^T, or None if sigma is not (numerically) positive definite."""
    try:
        return scipy.linalg.cholesky(sigma, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None

def eigen_factor(sigma):
    """F = V sqrt(lambda) over the positive eigenvalues, so that sigma = F F^T for any PSD sigma.

    Eigenvalues below the rounding level of sigma are dropped, so a rank-r covariance gives a
    d x r factor (which also makes the rest of the work smaller).
    """
    eigvals, eigvecs = scipy.linalg.eigh(sigma, check_finite=False)
    keep = eigvals > max(eigvals[-1], 0) * len(eigvals) * np.finfo(np.float64).eps
    return eigvecs[:, keep] * np.sqrt(eigvals[keep])

def trace_sqrt_product(sigma1, sigma2):
    """tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite matrices, as a real float."""
    sigma1, sigma2 = _symmetric(sigma1), _symmetric(sigma2)
    # The trace is symmetric in the two matrices, so factor whichever has a Cholesky factor; the
    # eigen-decomposition is the (several times slower) fallback when both are singular.
    factor, other = cholesky_factor(sigma1), sigma2
    if factor is None:
        factor, other = cholesky_factor(sigma2), sigma1
    if factor is None:
        factor, other = eigen_factor(sigma1), sigma2
    inner = factor.T @ other @ factor
    eigvals = scipy.linalg.eigvalsh(_symmetric(inner), check_finite=False)
    return float(np.sqrt(eigvals.clip(min=0)).sum())

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); a finite, non-negative float."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'Statistics do not match: mu {list(mu1.shape)} and {list(mu2.shape)}, sigma {list(sigma1.shape)} and {list(sigma2.shape)}')
    for name, value in [('mu', mu1), ('sigma', sigma1), ('reference mu', mu2), ('reference sigma', sigma2)]:
        if not np.all(np.isfinite(value)):
            raise ValueError(f'{name} contains NaN or infinite values')
    mean_term = np.square(mu1 - mu2).sum()
    trace_term = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(mean_term + trace_term, 0)) # Rounding can take identical statistics a hair below 0.

#----------------------------------------------------------------------------
# Mean and covariance of features, summed in float64 over batches and ranks.

class FeatureMoments:
    """Running sums of features and their outer products; `stats()` gives EDM's (mu, sigma).

    sigma is the unbiased sample covariance, as in EDM's fid.py, so reference files agree.
    """
    def __init__(self, feature_dim, device=torch.device('cpu')):
        self.num = torch.zeros([], dtype=torch.float64, device=device)
        self.sum = torch.zeros([feature_dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=device)

    def add(self, features):
        features = features.to(torch.float64)
        self.num += features.shape[0]
        self.sum += features.sum(dim=0)
        self.sum_outer += features.T @ features

    def all_reduce(self):
        """Sum the moments of all ranks (a no-op in a single process)."""
        for tensor in [self.num, self.sum, self.sum_outer]:
            dist.all_reduce_sum(tensor)
        return self

    def stats(self):
        """(mu, sigma) as float64 numpy arrays."""
        n = float(self.num)
        if n < 2:
            raise ValueError(f'Statistics need at least 2 images, got {int(n)}')
        mu = self.sum / n
        sigma = (self.sum_outer - torch.outer(mu, mu) * n) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

#----------------------------------------------------------------------------

def feature_moments(detector, dataset, batch_size=64, num_workers=2, device=torch.device('cpu'), progress=True):
    """FeatureMoments of `detector` over all images of `dataset`, summed over all ranks.

    Each rank reads its share of the batches; moments are float64 sums, so the result does not
    depend on the number of ranks beyond the order of float64 additions.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    moments = FeatureMoments(detector.feature_dim, device=device)
    num_batches = len(dataset_lib.rank_batch_indices(len(dataset), batch_size, rank, world_size))
    batches = dataset_lib.iterate_image_batches(dataset, batch_size, rank, world_size, num_workers=num_workers)
    for images, _labels in tqdm.tqdm(batches, total=num_batches, unit='batch', disable=(not progress or rank != 0)):
        moments.add(detector(images.to(device)))
    return moments.all_reduce()

#----------------------------------------------------------------------------
# Reference statistics files: EDM's .npz with float64 `mu` [D] and `sigma` [D, D].

class StatsError(Exception):
    """A statistics file that cannot be used; the message is one line meant for the user as is."""

def list_names(names, limit=5):
    names = [str(name) for name in names]
    return ', '.join(names[:limit]) + (f' and {len(names) - limit} more' if len(names) > limit else '') if names else 'nothing'

def load_stats(path_or_url, verbose=True, with_detector=False):
    """(mu, sigma) from a reference .npz file or URL; with_detector adds the detector recorded in
    the file by save_stats (None for EDM's reference files, which are made with Inception)."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise StatsError(f'{path_or_url} is a single .npy array, not an .npz file with "mu" and "sigma"')
            with npz:
                keys = list(npz.keys())
                if 'mu' not in keys or 'sigma' not in keys:
                    raise StatsError(f'{path_or_url} has no "mu" and "sigma" arrays (it has: {list_names(keys)}); '
                        f'make reference statistics with "fid.py ref"')
                mu, sigma = npz['mu'].astype(np.float64), npz['sigma'].astype(np.float64)
                detector = recorded_identity(npz, keys, path_or_url)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise StatsError(f'Reference statistics not found: {path_or_url}') from e
    except dnnlib.util.DownloadError as e:
        raise StatsError(str(e)) from e
    except (OSError, ValueError, EOFError) as e: # np.load's ways of saying "not an npz file".
        raise StatsError(f'Cannot read {path_or_url} as an .npz file ({type(e).__name__}: {e})') from e
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise StatsError(f'{path_or_url} holds mu of shape {list(mu.shape)} and sigma of shape {list(sigma.shape)}; expected [D] and [D, D]')
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise StatsError(f'{path_or_url} holds NaN or infinite values in mu or sigma; make the reference statistics again with "fid.py ref"')
    return (mu, sigma, detector) if with_detector else (mu, sigma)

def save_stats(path, mu, sigma, detector=None, features=None):
    """Write EDM's reference format atomically. `detector` (the detector's path or URL, or a
    dict(name=..., sha256=...)) is recorded by name and file hash, so that fid.py calc can check that
    it is given the same detector; it never decides what gets loaded. `features` (float32 [N, D],
    the per-image features, for KID) are stored beside mu and sigma when given."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    extra = {} if features is None else dict(features=np.asarray(features, dtype=np.float32))
    if detector is not None:
        identity = detector if isinstance(detector, dict) else dict(name=detector, sha256=None)
        extra['detector'] = np.array(feature_detectors.identity_name(identity['name']))
        if identity.get('sha256'):
            extra['detector_sha256'] = np.array(identity['sha256'])
    with dnnlib.util.atomic_write(path) as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)

def load_reference_features(path_or_url, verbose=True):
    """The per-image features (float32 [N, D]) that "fid.py ref --features" stored in a reference file."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            with np.load(f, allow_pickle=False) as npz:
                if 'features' not in npz.files:
                    raise StatsError(f'{path_or_url} holds no per-image features, which KID needs; rebuild it with "fid.py ref --features"')
                features = npz['features']
    except (FileNotFoundError, IsADirectoryError) as e:
        raise StatsError(f'Reference statistics not found: {path_or_url}') from e
    except dnnlib.util.DownloadError as e:
        raise StatsError(str(e)) from e
    except (OSError, ValueError, EOFError, TypeError) as e: # np.load's ways of saying "not an npz file" (TypeError: a bare .npy).
        raise StatsError(f'Cannot read {path_or_url} as an .npz file ({type(e).__name__}: {e})') from e
    if features.ndim != 2 or features.dtype.kind != 'f' or not np.all(np.isfinite(features)):
        raise StatsError(f'{path_or_url} holds "features" of shape {list(features.shape)} and type {features.dtype}; expected finite [N, D] floats')
    return features.astype(np.float32, copy=False)

def recorded_identity(npz, keys, where):
    """dict(name, sha256) of the detector recorded in a statistics file, or None (EDM's files).

    Older files record a relative path or URL under `detector`: only its file name is kept."""
    if 'detector' not in keys:
        return None
    name, sha256 = npz['detector'], npz['detector_sha256'] if 'detector_sha256' in keys else None
    if name.dtype.kind != 'U' or name.ndim != 0 or (sha256 is not None and (sha256.dtype.kind != 'U' or sha256.ndim != 0)):
        raise StatsError(f'{where} records its detector as a {name.dtype} array, expected a string')
    return dict(name=feature_detectors.identity_name(str(name)), sha256=str(sha256) if sha256 is not None else None)

def check_detector(recorded, detector, stats_path):
    """StatsError unless `detector` (a loaded FeatureDetector) is the one recorded in the statistics."""
    if recorded is None:
        return
    name = feature_detectors.identity_name(detector.source)
    if recorded['sha256'] is not None:
        same = recorded['sha256'] == getattr(detector, 'sha256', None)
    else:
        same = recorded['name'] == name
    if not same:
        made = recorded['name'] + (f' (sha256 {recorded["sha256"][:12]}...)' if recorded['sha256'] else '')
        raise StatsError(f'{stats_path} was made with detector {made}, not with {detector.source}'
            + (f' (sha256 {detector.sha256[:12]}...)' if recorded['sha256'] and getattr(detector, 'sha256', None) else '')
            + '; pass that detector with --detector')

#----------------------------------------------------------------------------

"""FID with uncertainty: bootstrap intervals over seed blocks, paired comparisons, FID-infinity; and KID.

Use:
    features = load_features('a.npz')                        # or FeatureSet(features, seeds)
    ref = ReferenceRoot(ref_mu, ref_sigma)
    result = fid_with_interval(features, ref)                # result['fid'], result['ci'], result['fid_inf'], ...
    result = paired_comparison(features_a, features_b, ref)  # result['difference'], result['ci'], ...
    result = kid_with_error(features, ref_features)          # result['kid'], result['kid_se'], ...

The generated images are split into blocks of consecutive seeds (default 100 blocks). Each
bootstrap resample draws blocks with replacement, i.e. multinomial counts w_b; the resampled mean
and covariance are weighted sums of per-block moments, so no resample touches the N x D features:

    n* = sum_b w_b n_b,  mu* = m + sum_b w_b s_b / n*,  S* = n*/(n*-1) (sum_b w_b M_b / n* - (mu*-m)(mu*-m)^T)

with s_b, M_b the sums and second moments of block b's features centred at the full-set mean m.
The reference statistics are fixed (users compare to one fixed reference), so R = Sigma_ref^(1/2)
is computed once, and FID = ||mu - mu_ref||^2 + tr S + tr Sigma_ref - 2 tr (R S R)^(1/2).
The mean term and tr S* are exact per resample. The last term is computed in one of two ways:

  exact:      eigvalsh(R S* R) per resample (d^3 per resample; needs every M_b: B d^2 floats).
  expansion:  f(S) = tr (R S R)^(1/2) expanded to second order around the full-set covariance S
              (see ResampledFrechet): one N d^2 pass for S, one eigen-decomposition, one N d^2 pass
              for the block second moments in its eigenbasis and a B x B matrix, then O(B^2) per
              resample. The neglected terms are third order; benchmarks/fid_bootstrap.py --validate
              compares it with exact. The passes multiply float32 chunks and sum them in float64
              (see BlockStatistics): FID agrees with float64 arithmetic to about 1e-9 relative.

'auto' takes the exact route for d <= 256 and the expansion above.

Intervals are bootstrap percentile intervals of theta* - mean(theta*) added to the measured value:
the bootstrap's own finite-N bias is removed, so the FID interval is one for E[FID_N], the expected
FID of N images of this generator (not the population FD: FID_N is biased upward by O(d/N)).
Intervals of FDs (never of FD differences) are clipped at 0 (see nonnegative_interval).
FID-infinity (Chong & Forsyth, CVPR 2020) fits FID_n = FID_inf + k/n over nested subsets of whole
seed blocks (default 20%, 40%, ..., 100%) and takes the intercept; each resample refits with the
same block weights, which gives its interval. It estimates the population FD.
"""

import os
import re

import numpy as np
import scipy.linalg

import dnnlib

#----------------------------------------------------------------------------

DEFAULT_BLOCKS = 100
DEFAULT_RESAMPLES = 200
EXACT_MAX_DIM = 256
FID_INF_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
CHUNK_ROWS = 1024      # Rows per product of the second-moment passes.
GRAM_COLUMNS = 8192    # Matrix entries per float32 product of the expansion's Gram matrix.

class UncertaintyError(Exception):
    """Input the statistics cannot use; the message is one line meant for the user as is."""

#----------------------------------------------------------------------------
# Per-image features with their seeds.

class FeatureSet:
    """Features [N, D] (float32) of N images and, where known, the seed of each (int64 [N])."""
    def __init__(self, features, seeds=None, source='features'):
        self.features = np.asarray(features, dtype=np.float32)
        self.seeds = None if seeds is None else np.asarray(seeds, dtype=np.int64)
        self.source = str(source)
        if self.features.ndim != 2:
            raise UncertaintyError(f'{self.source}: features must be a [N, D] matrix, got shape {list(self.features.shape)}')
        if self.seeds is not None:
            if self.seeds.shape != (len(self.features),):
                raise UncertaintyError(f'{self.source}: {len(self.seeds)} seeds for {len(self.features)} feature rows')
            if len(np.unique(self.seeds)) != len(self.seeds):
                raise UncertaintyError(f'{self.source}: the same seed appears more than once; pairing by seed needs each seed once')

    def __len__(self):
        return len(self.features)

    @property
    def dim(self):
        return self.features.shape[1]

    def sorted_by_seed(self):
        if self.seeds is None or np.all(self.seeds[1:] > self.seeds[:-1]):
            return self
        order = np.argsort(self.seeds, kind='stable')
        return FeatureSet(self.features[order], self.seeds[order], self.source)

def save_features(path, feature_set, detector=None):
    """Write `features` (float32 [N, D]) and, if known, `seeds` (int64 [N]) atomically."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = dict(features=feature_set.features)
    if feature_set.seeds is not None:
        arrays['seeds'] = feature_set.seeds
    if detector is not None:
        arrays['detector'] = np.array(detector)
    with dnnlib.util.atomic_write(path) as f:
        np.savez(f, **arrays)

def is_feature_file(path):
    """Is `path` an .npz holding a `features` array (as save_features writes)?"""
    if not (os.path.isfile(path) and str(path).lower().endswith('.npz')):
        return False
    try:
        with np.load(path) as npz:
            return 'features' in npz.files
    except Exception: # Damaged or not an npz at all: not a features file; the image reader names what is wrong.
        return False

def load_features(path):
    try:
        with np.load(path) as npz:
            if 'features' not in npz.files:
                raise UncertaintyError(f'{path} has no "features" array; make one with "fid.py features"')
            return FeatureSet(npz['features'], npz['seeds'] if 'seeds' in npz.files else None, source=path)
    except (OSError, ValueError) as e:
        raise UncertaintyError(f'Cannot read {path} as a features .npz file ({e})') from e

SEED_NAME = re.compile(r'(?:^|[^0-9])([0-9]+)\.[A-Za-z]+$')

def seeds_of_images(images):
    """The seed of every image of a training.dataset.Dataset, in its order, or None if unknown.

    Image files are named by seed as generate.py writes them (000123.png, also inside subfolders);
    .npz sample files carry a `seeds` record (generate.py --npz).
    """
    raw_idx = images._raw_idx
    if hasattr(images, 'image_fnames'):
        matches = [SEED_NAME.search(os.path.basename(name)) for name in images.image_fnames]
        if not all(matches):
            return None
        all_seeds = np.array([int(m.group(1)) for m in matches], dtype=np.int64)
    elif hasattr(images, 'files'):
        parts = []
        for fname in images.files:
            with np.load(fname) as npz:
                if 'seeds' not in npz.files:
                    return None
                parts.append(np.asarray(npz['seeds'], dtype=np.int64))
        all_seeds = np.concatenate(parts)
    else:
        return None
    seeds = all_seeds[raw_idx]
    return seeds if len(np.unique(seeds)) == len(seeds) else None

#----------------------------------------------------------------------------
# The fixed reference and the pieces of the Frechet distance.

def _symmetric(matrix):
    return (matrix + matrix.T) * 0.5

class ReferenceRoot:
    """Reference mu and Sigma with R = Sigma^(1/2) (symmetric), computed once for all resamples."""
    def __init__(self, mu, sigma):
        self.mu = np.asarray(mu, dtype=np.float64)
        self.sigma = _symmetric(np.asarray(sigma, dtype=np.float64))
        if self.mu.ndim != 1 or self.sigma.shape != self.mu.shape * 2:
            raise UncertaintyError(f'Reference statistics have mu of shape {list(self.mu.shape)} and sigma of shape {list(self.sigma.shape)}')
        eigvals, eigvecs = scipy.linalg.eigh(self.sigma, check_finite=False)
        self.root = _symmetric((eigvecs * np.sqrt(eigvals.clip(min=0))) @ eigvecs.T)
        self.trace = float(np.trace(self.sigma))

    @property
    def dim(self):
        return len(self.mu)

def sqrt_trace_and_gradient(ref, sigma, with_gradient=True):
    """f = tr (R sigma R)^(1/2) and, optionally, its gradient G = 1/2 R (R sigma R)^(-1/2) R in sigma."""
    inner = _symmetric(ref.root @ sigma @ ref.root)
    if not with_gradient:
        return float(np.sqrt(scipy.linalg.eigvalsh(inner, check_finite=False).clip(min=0)).sum()), None
    eigvals, eigvecs = scipy.linalg.eigh(inner, check_finite=False)
    positive = eigvals > max(eigvals[-1], 0) * len(eigvals) * np.finfo(np.float64).eps
    inv_root = (eigvecs[:, positive] / np.sqrt(eigvals[positive])) @ eigvecs[:, positive].T
    return float(np.sqrt(eigvals[positive]).sum()), _symmetric(0.5 * ref.root @ inv_root @ ref.root)

def mean_and_covariance(feature_set):
    """(mu, sigma) of the features in float64 with the unbiased covariance, as FeatureMoments gives them from images."""
    x = feature_set.features
    mu = x.mean(axis=0, dtype=np.float64)
    second = np.zeros([x.shape[1]] * 2)
    for start in range(0, len(x), CHUNK_ROWS):
        centred = x[start:start + CHUNK_ROWS].astype(np.float64) - mu
        second += centred.T @ centred
    return mu, _symmetric(second / (len(x) - 1))

def check_dims(feature_set, ref):
    if feature_set.dim != ref.dim:
        raise UncertaintyError(f'{feature_set.source} holds {feature_set.dim}-dimensional features, but the reference statistics '
            f'are {ref.dim}-dimensional; use the detector that made the reference')

#----------------------------------------------------------------------------
# Block moments and resampled Frechet distances.

def block_index(num_images, num_blocks):
    """Block of every row: rows (sorted by seed) in num_blocks runs of consecutive seeds."""
    if num_blocks < 1 or num_images < 2 * num_blocks:
        raise UncertaintyError(f'{num_images} images in {num_blocks} blocks leaves fewer than 2 images per block; '
            f'use more images or fewer blocks (--blocks={max(num_images // 2, 1)} at most)')
    return (np.arange(num_images) * num_blocks) // num_images

class BlockStatistics:
    """Per-block moments of one feature set, about the full-set mean, for the resampled Frechet distance.

    Rows are in seed order and blocks are runs of consecutive rows. counts [B], sums [B, D],
    sq_norms [B] (tr M_b), and on the exact route second [B, D, D] (M_b); the expansion route keeps
    the full second moment instead and asks transformed_second_moments() for the blocks' moments in
    the eigenbasis of R S R. The centre m is the mean rounded to float32, so that the float32 passes
    and the float64 sums are about the same point; the sums about m carry the rest of the mean.

    The N D^2 passes of the expansion route multiply float32 chunks of centred rows and add the
    products into float64 sums: a chunk's rounding is relative 1e-7 of its own sum and independent
    across chunks, so the moments of N rows are good to about 1e-7 / sqrt(N / CHUNK_ROWS), far below
    the float32 features' own precision. Diagonals, which carry tr S exactly, are summed in float64.
    """
    def __init__(self, features, blocks, num_blocks, exact):
        self.num_blocks, self.exact = num_blocks, exact
        self.features = features
        self.bounds = np.searchsorted(blocks, np.arange(num_blocks + 1)) # Block b is rows bounds[b]:bounds[b + 1].
        self.center32 = features.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.center = self.center32.astype(np.float64)
        self.counts = np.diff(self.bounds).astype(np.float64)
        d = features.shape[1]
        self.sums = np.zeros([num_blocks, d])
        self.sq_norms = np.zeros(num_blocks)
        self.second = np.zeros([num_blocks, d, d]) if exact else None
        for b, x in self._centered_blocks():
            self.sums[b] = x.sum(axis=0)
            self.sq_norms[b] = np.square(x).sum()
            if exact:
                self.second[b] = x.T @ x
        self.full_second = self.second.sum(axis=0) if exact else self.second_moment(np.arange(len(features)))

    def _centered_blocks(self, block_mask=None):
        for b in range(self.num_blocks):
            if block_mask is None or block_mask[b]:
                yield b, self.features[self.bounds[b]:self.bounds[b + 1]].astype(np.float64) - self.center

    def block_rows(self, block_mask):
        return np.concatenate([np.arange(self.bounds[b], self.bounds[b + 1]) for b in np.flatnonzero(block_mask)])

    def second_moment(self, rows):
        """Sum of (x - m)(x - m)^T over the given rows, [D, D] float64 (float32 products of row chunks)."""
        d = self.features.shape[1]
        second, diagonal = np.zeros([d, d]), np.zeros(d)
        for start in range(0, len(rows), CHUNK_ROWS):
            x = self.features[rows[start:start + CHUNK_ROWS]] - self.center32
            second += x.T @ x
            diagonal += np.square(x, dtype=np.float64).sum(axis=0)
        second[np.diag_indices(d)] = diagonal
        return second

    def covariance(self, block_mask):
        """Mean and unbiased covariance of the rows in the blocks of block_mask (one pass over them unless exact or all blocks)."""
        block_mask = np.asarray(block_mask, dtype=bool)
        n = self.counts[block_mask].sum()
        mean_offset = self.sums[block_mask].sum(axis=0) / n
        if block_mask.all():
            second = self.full_second
        elif self.exact:
            second = self.second[block_mask].sum(axis=0)
        else:
            second = self.second_moment(self.block_rows(block_mask))
        sigma = (second / n - np.outer(mean_offset, mean_offset)) * (n / (n - 1))
        return self.center + mean_offset, _symmetric(sigma)

    def transformed_second_moments(self, transform):
        """Block second moments C_b of y = (x - m) @ transform: diagonals [B, D] in float64 and the
        entries above the diagonal [B, D (D - 1) / 2] (row by row) in float32, block by block."""
        transform32 = transform.astype(np.float32)
        d = transform.shape[1]
        above = np.flatnonzero(np.triu(np.ones([d, d], dtype=bool), k=1))
        diagonals = np.empty([self.num_blocks, d])
        upper = np.empty([self.num_blocks, len(above)], dtype=np.float32)
        for b in range(self.num_blocks):
            y = (self.features[self.bounds[b]:self.bounds[b + 1]] - self.center32) @ transform32
            diagonals[b] = np.square(y, dtype=np.float64).sum(axis=0)
            upper[b] = (y.T @ y).ravel()[above]
        return diagonals, upper

class ResampledFrechet:
    """FID of the block moments under any block weights, against a fixed reference.

    The expansion route expands f(S*) = tr (R S* R)^(1/2) around the covariance S of all images,
    whatever subset the weights select (every resample's covariance lies O(1/sqrt(n)) from S), to
    second order. In the eigenbasis R S R = V diag(lam) V^T, with E = V^T R (S* - S) R V,

        f(S*) = f(S) + sum_i E_ii / (2 sqrt(lam_i)) + 1/2 sum_ij K_ij E_ij^2,   K_ij = -1 / (2 sqrt(lam_i lam_j) (sqrt(lam_i) + sqrt(lam_j)))

    (the Daleckii-Krein formula for the second derivative of a trace function). With y = (x - m) R V
    and C_b the block second moments of y, E = sum_b delta_b C_b - rank-one mean term, delta_b =
    alpha_b - 1/(n-1), alpha_b = w_b n*/(n*-1)/n*. Split C_b = D_b + n_b diag(c) around the average
    moment per image c, so that sum_b D_b = 0: the quadratic term is then 1/2 (delta^T H delta +
    2 t g^T delta + t^2 k) with t = sum_b delta_b n_b, the B x B matrix H_bc = <K, D_b o D_c>,
    g_b = <K, D_b o diag(c)> and k = <K, diag(c)^2>, all computed once. H holds fluctuations only,
    so its entries above the diagonal are float32 products (summed in float64 per GRAM_COLUMNS)
    without the cancellation that the full C_b would bring. The mean's rank-one part enters the first
    order term exactly and the quadratic one only at third order, which is dropped. The first-order
    term alone (a "linearized" bootstrap) is too narrow whenever FID is not large against its own
    finite-N bias: near equal distributions the gradient vanishes and the quadratic part dominates.
    """
    def __init__(self, stats, ref):
        self.stats, self.ref = stats, ref
        self.num_images = int(stats.counts.sum())
        full = np.ones(stats.num_blocks, dtype=bool)
        if stats.exact:
            self.fid = self.subset_fid(full)[0]
            return
        mu, sigma = stats.covariance(full)
        inner = _symmetric(ref.root @ sigma @ ref.root)
        eigvals, eigvecs = scipy.linalg.eigh(inner, check_finite=False)
        positive = eigvals > max(eigvals[-1], 0) * len(eigvals) * 1e-10 # Directions the expansion cannot follow keep their value of f(S).
        lam = eigvals[positive]
        self.sqrt_trace = float(np.sqrt(eigvals.clip(min=0)).sum())
        self.fid = float(max(np.square(mu - ref.mu).sum() + np.trace(sigma) + ref.trace - 2 * self.sqrt_trace, 0))
        transform = ref.root @ eigvecs[:, positive]
        diagonals, upper = stats.transformed_second_moments(transform)
        root = np.sqrt(lam)
        # First order: <G, M_b> = 1/2 sum_i (C_b)_ii / sqrt(lam_i) with G = 1/2 T diag(1/sqrt(lam)) T^T, which acts on mean offsets too.
        self.quad = 0.5 * (diagonals / root).sum(axis=1)
        self.transform, self.root = transform, root
        kernel = -0.5 / (root[:, None] * root[None, :] * (root[:, None] + root[None, :]))
        per_image = diagonals.sum(axis=0) / self.num_images
        centred = diagonals - stats.counts[:, None] * per_image # Diagonals of D_b.
        kernel_diagonal = np.diagonal(kernel)
        self.gram = (centred * kernel_diagonal) @ centred.T
        upper *= np.sqrt(-2 * kernel[np.triu_indices(len(lam), k=1)]).astype(np.float32) # Each entry above the diagonal stands for two.
        for start in range(0, upper.shape[1], GRAM_COLUMNS):
            part = upper[:, start:start + GRAM_COLUMNS]
            self.gram -= part @ part.T
        del upper
        self.gram_cross = (centred * kernel_diagonal * per_image).sum(axis=1)
        self.gram_mean = float((kernel_diagonal * np.square(per_image)).sum())
        n = self.num_images
        self.alpha_full = np.full(stats.num_blocks, 1 / (n - 1))
        self.base_inner = self._inner(np.ones([1, stats.num_blocks]))[0] # <G, S> from the same sums as the resamples.

    def subset_fid(self, block_mask, with_gradient=False):
        """(FID, tr (R S R)^(1/2), G or None) of the images in the blocks of block_mask, exactly."""
        mu, sigma = self.stats.covariance(np.asarray(block_mask, dtype=bool))
        sqrt_trace, gradient = sqrt_trace_and_gradient(self.ref, sigma, with_gradient=with_gradient)
        fid = float(max(np.square(mu - self.ref.mu).sum() + np.trace(sigma) + self.ref.trace - 2 * sqrt_trace, 0))
        return fid, sqrt_trace, gradient

    def _moments(self, weights):
        n = weights @ self.stats.counts
        offset = (weights @ self.stats.sums) / n[:, None]
        return n, offset, n / (n - 1)

    def _inner(self, weights):
        n, offset, scale = self._moments(weights)
        return scale * ((weights @ self.quad) / n - 0.5 * (np.square(offset @ self.transform) / self.root).sum(axis=1))

    def __call__(self, weights):
        """FID of each resample: weights [R, B] (block counts) -> (fid [R], images [R])."""
        weights = np.asarray(weights, dtype=np.float64)
        n, offset, scale = self._moments(weights)
        mean_term = np.square(self.stats.center + offset - self.ref.mu).sum(axis=1)
        trace = scale * ((weights @ self.stats.sq_norms) / n - np.square(offset).sum(axis=1))
        if self.stats.exact:
            sqrt_trace = np.empty(len(weights))
            for start in range(0, len(weights), 32): # Batched eigvalsh over resamples, 32 at a time.
                part = slice(start, start + 32)
                second = np.tensordot(weights[part], self.stats.second, axes=1) / n[part, None, None]
                sigma = scale[part, None, None] * (second - offset[part, :, None] * offset[part, None, :])
                inner = self.ref.root @ sigma @ self.ref.root
                eigvals = np.linalg.eigvalsh((inner + inner.transpose(0, 2, 1)) * 0.5)
                sqrt_trace[part] = np.sqrt(eigvals.clip(min=0)).sum(axis=1)
        else:
            delta = weights * (scale / n)[:, None] - self.alpha_full
            total = delta @ self.stats.counts
            second_order = 0.5 * (((delta @ self.gram) * delta).sum(axis=1) + 2 * total * (delta @ self.gram_cross) + np.square(total) * self.gram_mean)
            sqrt_trace = self.sqrt_trace + self._inner(weights) - self.base_inner + second_order
        return np.maximum(mean_term + trace + self.ref.trace - 2 * sqrt_trace, 0), n

#----------------------------------------------------------------------------
# Intervals.

def resample_draws(num_blocks, num_resamples, seed=0):
    """[R, B] block indices: each resample draws num_blocks blocks with replacement, in order."""
    return np.random.default_rng(seed).integers(num_blocks, size=[num_resamples, num_blocks])

def draw_weights(draws, num_blocks, num_drawn=None):
    """[R, B] block counts of the first num_drawn draws of each resample (all by default)."""
    draws = draws[:, :num_drawn]
    weights = np.zeros([len(draws), num_blocks])
    np.add.at(weights, (np.repeat(np.arange(len(draws)), draws.shape[1]), draws.ravel()), 1)
    return weights

def resample_weights(num_blocks, num_resamples, seed=0):
    """[R, B] multinomial block counts: each row draws num_blocks blocks with replacement."""
    return draw_weights(resample_draws(num_blocks, num_resamples, seed), num_blocks)

def centered_interval(estimate, resampled, confidence=0.95):
    """estimate + percentiles of (resampled - their mean): the bootstrap's own bias removed."""
    spread = np.asarray(resampled) - np.mean(resampled)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(spread, [alpha, 1 - alpha])
    return [float(estimate + lo), float(estimate + hi)]

def nonnegative_interval(estimate, resampled, confidence=0.95):
    """(centered_interval clipped at 0, whether it was) for a quantity that cannot be negative, as every FD.

    Where FID_N is mostly its own finite-N bias (population FD near 0, few images for the dimension)
    the resampled FDs are skewed to the right and spread wider than FID_N varies, and the centred
    lower end can fall below 0. Clipping never excludes a value the FD can take, so coverage is unchanged.
    """
    lo, hi = centered_interval(estimate, resampled, confidence)
    return [max(lo, 0.0), max(hi, 0.0)], bool(lo < 0)

def choose_exact(dim, method):
    if method not in ('auto', 'exact', 'expansion'):
        raise UncertaintyError(f'Unknown method "{method}"; use auto, exact or expansion')
    return dim <= EXACT_MAX_DIM if method == 'auto' else method == 'exact'

def intercept_fit(inv_sizes, values):
    """Least-squares intercept of values ~ a + k x along the last axis (one fit per row)."""
    x_mean, y_mean = inv_sizes.mean(axis=-1, keepdims=True), values.mean(axis=-1, keepdims=True)
    slope = ((inv_sizes - x_mean) * (values - y_mean)).sum(axis=-1) / np.square(inv_sizes - x_mean).sum(axis=-1)
    return y_mean[..., 0] - slope * x_mean[..., 0]

def block_statistics(feature_set, ref, num_blocks, method):
    check_dims(feature_set, ref)
    exact = choose_exact(feature_set.dim, method)
    if exact and num_blocks * feature_set.dim ** 2 * 8 > 4 << 30:
        raise UncertaintyError(f'The exact route needs {num_blocks} x {feature_set.dim}^2 block moments (over 4 GiB); use --method=expansion')
    upper = feature_set.dim * (feature_set.dim - 1) // 2
    if not exact and num_blocks * upper * 4 > 8 << 30:
        raise UncertaintyError(f'The expansion route keeps {num_blocks} x {upper} float32 block moments (over 8 GiB) at {feature_set.dim} '
            f'dimensions; use --blocks={(8 << 30) // (upper * 4)} or fewer')
    blocks = block_index(len(feature_set), num_blocks)
    return BlockStatistics(feature_set.features, blocks, num_blocks, exact)

def fid_with_interval(feature_set, ref, num_blocks=DEFAULT_BLOCKS, num_resamples=DEFAULT_RESAMPLES, method='auto',
        confidence=0.95, fid_inf_fractions=FID_INF_FRACTIONS, seed=0):
    """FID with its bootstrap interval (for E[FID_N]) and FID-infinity with its interval (for the population FD)."""
    feature_set = feature_set.sorted_by_seed()
    stats = block_statistics(feature_set, ref, num_blocks, method)
    draws = resample_draws(num_blocks, num_resamples, seed)
    full = ResampledFrechet(stats, ref)
    resampled, _ = full(draw_weights(draws, num_blocks))
    ci, clipped = nonnegative_interval(full.fid, resampled, confidence)
    result = dict(fid=full.fid, ci=ci, ci_clipped=clipped, num_images=len(feature_set),
        blocks=num_blocks, resamples=num_resamples, confidence=confidence, method='exact' if stats.exact else 'expansion')
    if fid_inf_fractions:
        # Nested subsets of whole blocks: prefixes of one random block order; in each resample the
        # prefixes of its sequence of drawn blocks, so every subset keeps its number of blocks.
        order = np.random.default_rng(seed + 1).permutation(num_blocks)
        prefixes = sorted({max(int(round(fraction * num_blocks)), 1) for fraction in fid_inf_fractions})
        if len(prefixes) < 2:
            raise UncertaintyError('FID-infinity needs at least two different subset sizes; use more blocks')
        sizes, points, runs = [], [], []
        for m in prefixes:
            mask = np.zeros(num_blocks, dtype=bool)
            mask[order[:m]] = True
            sizes.append(stats.counts[mask].sum())
            points.append(full.fid if m == num_blocks else full.subset_fid(mask)[0])
            runs.append(full(draw_weights(draws, num_blocks, m)))
        point = intercept_fit(1 / np.array(sizes), np.array(points))
        inf_resampled = intercept_fit(1 / np.stack([n for _fid, n in runs], axis=1), np.stack([fid for fid, _n in runs], axis=1))
        inf_ci, inf_clipped = nonnegative_interval(point, inf_resampled, confidence)
        result.update(fid_inf=float(point), fid_inf_ci=inf_ci, fid_inf_ci_clipped=inf_clipped,
            fid_inf_sizes=[int(n) for n in sizes], fid_inf_points=points)
    return result

def paired_comparison(set_a, set_b, ref, num_blocks=DEFAULT_BLOCKS, num_resamples=DEFAULT_RESAMPLES, method='auto',
        confidence=0.95, unpaired=False, seed=0):
    """FID(A), FID(B) and FID(B) - FID(A) with a bootstrap interval.

    Paired (default): A and B must hold the same seeds; every resample takes the same seed blocks of
    both, so what the seeds do to both cancels. unpaired=True resamples A and B independently.
    """
    set_a, set_b = set_a.sorted_by_seed(), set_b.sorted_by_seed()
    if set_a.dim != set_b.dim:
        raise UncertaintyError(f'{set_a.source} holds {set_a.dim}-dimensional features but {set_b.source} {set_b.dim}-dimensional; use one detector for both')
    if not unpaired:
        if set_a.seeds is None or set_b.seeds is None:
            missing = set_a.source if set_a.seeds is None else set_b.source
            raise UncertaintyError(f'{missing} has no seeds (file names like 000123.png or an npz "seeds" record), so A and B cannot be '
                f'paired; pass --unpaired to compare them as independent sets')
        if not np.array_equal(set_a.seeds, set_b.seeds):
            common = len(np.intersect1d(set_a.seeds, set_b.seeds))
            raise UncertaintyError(f'A has {len(set_a)} seeds and B {len(set_b)}, {common} in common: a paired comparison needs the same seeds; '
                f'generate both from the same --seeds, or pass --unpaired')
    stats_a = block_statistics(set_a, ref, num_blocks, method)
    stats_b = block_statistics(set_b, ref, num_blocks, method)
    weights_a = resample_weights(num_blocks, num_resamples, seed)
    weights_b = resample_weights(num_blocks, num_resamples, seed + 12345) if unpaired else weights_a
    fd_a, fd_b = ResampledFrechet(stats_a, ref), ResampledFrechet(stats_b, ref)
    resampled_a, resampled_b = fd_a(weights_a)[0], fd_b(weights_b)[0]
    difference = fd_b.fid - fd_a.fid
    ci = centered_interval(difference, resampled_b - resampled_a, confidence)
    return dict(fid_a=fd_a.fid, fid_b=fd_b.fid, difference=difference, ci=ci,
        ci_a=nonnegative_interval(fd_a.fid, resampled_a, confidence)[0], ci_b=nonnegative_interval(fd_b.fid, resampled_b, confidence)[0],
        b_better_fraction=float(np.mean(resampled_b < resampled_a)), excludes_zero=bool(ci[0] > 0 or ci[1] < 0),
        paired=not unpaired, num_images_a=len(set_a), num_images_b=len(set_b), blocks=num_blocks, resamples=num_resamples,
        confidence=confidence, method='exact' if stats_a.exact else 'expansion')

#----------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", ICLR 2018).

KID_SUBSET_SIZE = 1000

def polynomial_kernel(x, y):
    """k(x, y) = (x . y / d + 1)^3 between all rows of x [m, d] and y [n, d], float64 [m, n] (KID's kernel)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.power(x @ y.T / x.shape[1] + 1, 3)

def unbiased_mmd2(x, y):
    """Unbiased estimate of MMD^2 between the distributions of the rows of x and y (Gretton et al. 2012, eq. 3):
    the means of k over pairs of distinct rows within x and within y, minus twice its mean over all pairs across."""
    m, n = len(x), len(y)
    within_x, within_y = polynomial_kernel(x, x), polynomial_kernel(y, y)
    return float((within_x.sum() - np.trace(within_x)) / (m * (m - 1)) + (within_y.sum() - np.trace(within_y)) / (n * (n - 1))
        - 2 * polynomial_kernel(x, y).mean())

def check_kid_sizes(num_images, num_reference, subset_size, source):
    """UncertaintyError unless there are two disjoint subsets of images and one of reference features."""
    if subset_size < 2:
        raise UncertaintyError(f'A KID subset needs at least 2 images, got a subset size of {subset_size}')
    if num_images < 2 * subset_size:
        raise UncertaintyError(f'{source}: {num_images} images make fewer than the 2 disjoint KID subsets of {subset_size} that a '
            f'standard error needs; use more images or --kid_subset={max(num_images // 2, 2)} at most')
    if num_reference < subset_size:
        raise UncertaintyError(f'The reference holds features of {num_reference} images, fewer than the KID subset size {subset_size}; '
            f'pass --kid_subset={num_reference} or less')

def kid_with_error(feature_set, ref_features, subset_size=KID_SUBSET_SIZE, seed=0):
    """KID: the mean of the unbiased MMD^2 over disjoint subsets of subset_size images, with its standard error.

    The images (in seed order) are cut into S = N // subset_size disjoint runs of consecutive seeds;
    each is compared with its own chunk of subset_size reference features, taken in turn from one
    seeded permutation of them. When the reference holds at least S * subset_size features the S
    estimates are independent and unbiased, so their mean is unbiased for MMD^2 and std / sqrt(S)
    is its standard error; with fewer, chunks wrap around and share reference features
    (`reference_reused`), and that error leaves out what the shared part varies by.
    """
    feature_set = feature_set.sorted_by_seed()
    ref_features = np.asarray(ref_features, dtype=np.float32)
    if ref_features.ndim != 2 or ref_features.shape[1] != feature_set.dim:
        raise UncertaintyError(f'{feature_set.source} holds {feature_set.dim}-dimensional features, but the reference features have shape '
            f'{list(ref_features.shape)}; use the detector that made the reference')
    check_kid_sizes(len(feature_set), len(ref_features), subset_size, feature_set.source)
    num_subsets = len(feature_set) // subset_size
    order = np.random.default_rng(seed).permutation(len(ref_features))
    estimates = np.array([unbiased_mmd2(feature_set.features[s * subset_size:(s + 1) * subset_size],
        ref_features[np.take(order, np.arange(s * subset_size, (s + 1) * subset_size), mode='wrap')]) for s in range(num_subsets)])
    return dict(kid=float(estimates.mean()), kid_se=float(estimates.std(ddof=1) / np.sqrt(num_subsets)), kid_subsets=num_subsets,
        kid_subset_size=subset_size, kid_images_used=num_subsets * subset_size, num_images=len(feature_set),
        num_reference=len(ref_features), reference_reused=bool(num_subsets * subset_size > len(ref_features)))

#----------------------------------------------------------------------------
# One line a paper can quote.

def _pct(confidence):
    return f'{100 * confidence:g}%'

def fid_line(result):
    clipped = lambda key: ', clipped at 0' if result.get(key) else ''
    line = (f'FID {result["fid"]:.3f} ({_pct(result["confidence"])} CI {result["ci"][0]:.3f}{clipped("ci_clipped")} to {result["ci"][1]:.3f}; '
        f'{result["num_images"]} images, block bootstrap over {result["blocks"]} seed blocks, {result["resamples"]} resamples, {result["method"]})')
    if 'fid_inf' in result:
        line += (f'; FID-infinity {result["fid_inf"]:.3f} ({_pct(result["confidence"])} CI {result["fid_inf_ci"][0]:.3f}{clipped("fid_inf_ci_clipped")} '
            f'to {result["fid_inf_ci"][1]:.3f})')
    return line

def kid_line(result):
    unused = result['num_images'] - result['kid_images_used']
    return (f'KID {result["kid"]:.4e} (standard error {result["kid_se"]:.1e}; mean unbiased MMD^2 over {result["kid_subsets"]} disjoint '
        f'subsets of {result["kid_subset_size"]} images' + (f' ({unused} left over)' if unused else '')
        + f' against {result["num_reference"]} reference features' + (', reused across subsets' if result['reference_reused'] else '')
        + ', kernel (x.y/d + 1)^3)')

def comparison_line(result):
    how = f'paired over {result["num_images_a"]} common seeds' if result['paired'] else \
        f'UNPAIRED ({result["num_images_a"]} and {result["num_images_b"]} images resampled independently)'
    verdict = 'the interval excludes 0' if result['excludes_zero'] else 'the interval includes 0: no difference shown'
    return (f'FID(A) {result["fid_a"]:.3f}, FID(B) {result["fid_b"]:.3f}, FID(B) - FID(A) {result["difference"]:+.3f} '
        f'({_pct(result["confidence"])} CI {result["ci"][0]:+.3f} to {result["ci"][1]:+.3f}; {how}, {result["blocks"]} blocks, '
        f'{result["resamples"]} resamples, {result["method"]}); B better in {100 * result["b_better_fraction"]:.0f}% of resamples; {verdict}')

#----------------------------------------------------------------------------

"""Mixture of low-rank Gaussians (MoLRG), the data model of Wang et al., "Diffusion models learn
low-dimensional distributions via subspace clustering" (2024), and its exact denoiser.

Class k of K has an orthonormal basis U_k (D x d, D = 3 * res * res) and its samples are

    x0 = U_k a,   a ~ N(0, I_d),

with equal class weights. As in the authors' code, the K bases are disjoint column blocks of one
random D x D orthogonal matrix (so the subspaces are mutually orthogonal), a D-vector is an image
in H, W, C order, and the values are used as they are: no scaling to [-1, 1], no clipping (each
pixel has variance d / D). A dataset is one torch file in the authors' format and under their
file name (`basis`, `data`, `conds`, ...), so files written by either codebase load in the other.

The denoiser is the posterior mean E[x0 | x] for x = x0 + sigma n (the optimal denoiser of the
distribution, not of a finite sample; for that see training/sampling/optimal_denoiser.py). With
Sigma_k = U_k U_k^T + sigma^2 I,

    E[x0 | x, k] = U_k U_k^T x / (1 + sigma^2),
    p(k | x)     = softmax_k( log pi_k + ||U_k^T x||^2 / (2 sigma^2 (1 + sigma^2)) - d/2 log(1 + sigma^2) ),

the second from log N(x; 0, Sigma_k) with Sigma_k^-1 = (I - U_k U_k^T / (1 + sigma^2)) / sigma^2
and log det Sigma_k = d log(1 + sigma^2) + D log sigma^2 (terms equal for every k dropped).
Nothing D x D is ever formed.
"""

import os

import numpy as np
import torch

import dnnlib
from training import dataset as dataset_lib

#----------------------------------------------------------------------------
# Generating and storing a dataset.

def dataset_filename(resolution, class_num, per_class_dim, sample_per_class):
    """The authors' file name, which trainMoLRG.py looks for in --path."""
    return f'MoLRG_dataset_resolution{resolution}_classnum{class_num}_perclassdim{per_class_dim}_sample{sample_per_class}.pt'

def check_molrg_config(resolution, class_num, per_class_dim, sample_per_class):
    """ValueError with a readable reason for a mixture that cannot exist."""
    dim = 3 * resolution * resolution
    if min(resolution, class_num, per_class_dim, sample_per_class) < 1:
        raise ValueError('resolution, class_num, per_class_dim and sample_per_class must all be at least 1')
    if class_num * per_class_dim > dim:
        raise ValueError(f'{class_num} orthogonal subspaces of dimension {per_class_dim} do not fit into '
            f'3x{resolution}x{resolution} = {dim} dimensions; lower --class_num or --per_class_dim or raise --img_res')

def generate_molrg(resolution, class_num, per_class_dim, sample_per_class, seed=0):
    """A new dataset as a dict in the authors' format; the same arguments give the same tensors.

    basis [K, D, d] float64 (D in H, W, C order), data [K * n, res, res, 3] float32 (class by
    class), conds [K * n] int64. The authors draw with torch's global generator and no seed, and
    keep the basis in float32; here a seeded generator makes the file reproducible and the basis
    stays float64 so that the closed-form denoiser is exact.
    """
    check_molrg_config(resolution, class_num, per_class_dim, sample_per_class)
    dim = 3 * resolution * resolution
    gen = torch.Generator().manual_seed(seed)
    # A Haar-random orthogonal matrix: QR of a Gaussian matrix with the signs of R's diagonal fixed.
    q, r = torch.linalg.qr(torch.randn([dim, dim], generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    basis = q[:, :class_num * per_class_dim].reshape(dim, class_num, per_class_dim).permute(1, 0, 2).contiguous()
    coefficients = torch.randn([class_num, sample_per_class, per_class_dim], generator=gen, dtype=torch.float64)
    data = torch.einsum('knd,kDd->knD', coefficients, basis).reshape(class_num * sample_per_class, resolution, resolution, 3)
    conds = torch.arange(class_num).repeat_interleave(sample_per_class)
    return dict(basis=basis, data=data.to(torch.float32), conds=conds, class_num=class_num, sample_per_class=sample_per_class,
        per_class_dim=per_class_dim, resolution=resolution, seed=seed)

def save_molrg(path, molrg):
    """Write a dataset dict atomically (a crash leaves no half-written file that a later run would trust)."""
    with dnnlib.util.atomic_write(path) as f:
        torch.save(molrg, f)

def load_molrg(path):
    """A dataset file (ours or the authors') -> molrg_tensors() of its contents; DatasetError for anything unusable."""
    if not os.path.isfile(path):
        raise dataset_lib.DatasetError(f'MoLRG dataset not found: {path}')
    try:
        raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e: # A damaged or foreign file fails to unpickle in many ways.
        raise dataset_lib.DatasetError(f'Cannot read MoLRG dataset {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
    return molrg_tensors(raw, where=path)

def molrg_tensors(raw, where='MoLRG data'):
    """A dataset dict in the authors' format -> EasyDict with the tensors in this codebase's layout:

    bases  [K, D, d] float64 with D in C, H, W order (x.reshape(N, -1) of an NCHW image),
    images [N, 3, res, res] float32, labels [N] int64, plus resolution, class_num, per_class_dim,
    sample_per_class and seed (None in the authors' files).
    """
    missing = [key for key in ('basis', 'data', 'conds') if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise dataset_lib.DatasetError(f'{where} is not a MoLRG dataset: no {", ".join(missing)} in it')
    if not all(torch.is_tensor(raw[key]) and raw[key].is_floating_point() != (key == 'conds') for key in ('basis', 'data', 'conds')):
        raise dataset_lib.DatasetError(f'{where}: basis and data must be float tensors and conds an integer tensor')
    basis, data, conds = raw['basis'], raw['data'], raw['conds'].to(torch.int64).reshape(-1)
    if basis.ndim != 3 or data.ndim != 4 or data.shape[1] != data.shape[2] or data.shape[3] != 3 or len(conds) != len(data) \
            or basis.shape[1] != data[0].numel() or (len(conds) and not 0 <= int(conds.min()) <= int(conds.max()) < basis.shape[0]):
        raise dataset_lib.DatasetError(f'{where}: inconsistent MoLRG tensors (basis {list(basis.shape)}, data {list(data.shape)}, conds {list(conds.shape)})')
    class_num, dim, per_class_dim = basis.shape
    resolution = data.shape[1]
    bases = basis.to(torch.float64).reshape(class_num, resolution, resolution, 3, per_class_dim).permute(0, 3, 1, 2, 4).reshape(class_num, dim, per_class_dim)
    return dnnlib.EasyDict(bases=bases, images=data.to(torch.float32).permute(0, 3, 1, 2).contiguous(), labels=conds,
        resolution=resolution, class_num=class_num, per_class_dim=per_class_dim,
        sample_per_class=int(raw.get('sample_per_class', len(data) // max(class_num, 1))), seed=raw.get('seed'))

def prepare_molrg(path, resolution, class_num, per_class_dim, sample_per_class, seed=0):
    """Generate the dataset file at `path`, or check the one already there; returns 'generated' or 'found'.

    An existing file is used as it is (as the authors' code does), after checking that it holds
    the mixture asked for; ValueError says what differs. Files without a recorded seed (the
    authors') are accepted for any seed.
    """
    check_molrg_config(resolution, class_num, per_class_dim, sample_per_class)
    if not os.path.exists(path):
        save_molrg(path, generate_molrg(resolution, class_num, per_class_dim, sample_per_class, seed=seed))
        return 'generated'
    try:
        found = load_molrg(path)
    except dataset_lib.DatasetError as e:
        raise ValueError(f'{e}; delete it to generate a new one') from e
    asked = dict(resolution=resolution, class_num=class_num, per_class_dim=per_class_dim, samples=class_num * sample_per_class)
    has = dict(resolution=found.resolution, class_num=found.class_num, per_class_dim=found.per_class_dim, samples=len(found.labels))
    differences = [f'{key} {has[key]} (asked for {asked[key]})' for key in asked if has[key] != asked[key]]
    if found.seed is not None and found.seed != seed:
        differences.append(f'data seed {found.seed} (asked for {seed})')
    if differences:
        raise ValueError(f'{path} already exists with {", ".join(differences)}; use another --path or delete the file')
    return 'found'

#----------------------------------------------------------------------------
# Training data.

class MoLRGDataset(dataset_lib.Dataset):
    """The samples of a MoLRG dataset file, for train.py (--data=FILE.pt) and trainMoLRG.py.

    Items are float32 CHW images on the uint8 value scale, (x + 1) * 127.5, because the training
    loop maps every dataset to network values with / 127.5 - 1; that gives back x up to float32
    rounding, without the quantization an 8-bit image would add (it would make every class
    full-rank). With use_labels the label is the one-hot class (the authors' code always trains
    unconditionally, whatever --cond says).
    """
    def __init__(self,
        path,                   # MoLRG dataset file (.pt).
        resolution  = None,     # Required resolution; None = whatever the file has.
        name        = 'MoLRG',  # Dataset name, for run folder names (the authors' name).
        max_size    = None,     # Use a random subset of this many samples; None = all.
        use_labels  = False,    # Return one-hot classes? False = labels of dimension zero.
        xflip       = False,    # Append mirrored copies (they leave the subspaces; off in the authors' code).
        random_seed = 0,        # Seed that picks the max_size subset.
        cache       = False,    # Accepted for train.py's dataset_kwargs; the samples are always in memory.
        **_kwargs,              # Other ImageFolderDataset arguments that train.py may pass (use_pyspng).
    ):
        del cache
        self._path = str(path)
        self._molrg = load_molrg(self._path)
        if resolution is not None and resolution != self._molrg.resolution:
            raise dataset_lib.DatasetError(f'{self._path} holds {self._molrg.resolution}x{self._molrg.resolution} samples, but resolution {resolution} was asked for')
        super().__init__(name=name, raw_shape=list(self._molrg.images.shape), max_size=max_size, use_labels=use_labels,
            xflip=xflip, random_seed=random_seed, cache=False)

    @property
    def path(self):
        return self._path

    @property
    def bases(self):
        return self._molrg.bases

    def _load_raw_image(self, raw_idx):
        return (self._molrg.images[raw_idx].numpy() + 1) * np.float32(127.5)

    def _load_raw_labels(self):
        return self._molrg.labels.numpy()

#----------------------------------------------------------------------------
# The closed-form denoiser.

class MoLRGDenoiser(torch.nn.Module):
    """D(x; sigma) = E[x0 | x0 + sigma n = x] for the mixture, in float64.

    Usable wherever a preconditioned network is: it has img_resolution, img_channels, label_dim,
    sigma_min, sigma_max, round_sigma and forward(x, sigma, class_labels), is differentiable by
    torch.func (jacobian.py), and has the sampler's denoise(x, sigma, step). With
    conditional=True it takes one-hot class labels (label_dim = K) and returns E[x0 | x, k];
    a label vector in general replaces the class weights as the prior.
    """
    def __init__(self,
        bases,                      # [K, D, d] orthonormal columns per class, D in C, H, W order.
        resolution,                 # Image size; D = 3 * resolution^2.
        class_weights   = None,     # [K] prior class probabilities; None = equal (as the data are drawn).
        conditional     = False,    # Take class labels (label_dim = K)? False = unconditional (label_dim = 0).
    ):
        super().__init__()
        bases = torch.as_tensor(bases, dtype=torch.float64)
        assert bases.ndim == 3 and bases.shape[1] == 3 * resolution * resolution
        self.img_resolution = resolution
        self.img_channels = 3
        self.label_dim = bases.shape[0] if conditional else 0
        self.sigma_min = 0
        self.sigma_max = float('inf')
        weights = torch.ones(bases.shape[0], dtype=torch.float64) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float64)
        self.register_buffer('bases', bases)
        self.register_buffer('log_class_weights', (weights / weights.sum()).log())

    @classmethod
    def from_file(cls, path, conditional=False):
        """The denoiser of a dataset file, with class weights from its class sizes."""
        molrg = load_molrg(path)
        counts = torch.bincount(molrg.labels, minlength=molrg.class_num).to(torch.float64)
        return cls(molrg.bases, molrg.resolution, class_weights=counts if counts.sum() > 0 else None, conditional=conditional)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def class_posterior_logits(self, x, sigma):
        """Unnormalized log p(k | x) [B, K] and the projections U_k^T x [B, K, d] of flat float64 x [B, D]."""
        variance = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).square()
        projections = torch.einsum('bD,kDd->bkd', x, self.bases)
        per_class_dim = self.bases.shape[2]
        logits = self.log_class_weights + projections.square().sum(dim=2) / (2 * variance * (1 + variance)) - 0.5 * per_class_dim * torch.log1p(variance)
        return logits, projections

    def forward(self, x, sigma, class_labels=None):
        """x: [B, 3, H, W] at noise level sigma (> 0; scalar or one per sample) -> float64 D(x; sigma)."""
        batch_shape = x.shape
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        logits, projections = self.class_posterior_logits(x, sigma)
        if self.label_dim and class_labels is not None:
            prior = class_labels.to(torch.float64).reshape(x.shape[0], self.label_dim)
            logits = logits - self.log_class_weights + (prior / prior.sum(dim=1, keepdim=True)).log() # log 0 = -inf drops a class.
        responsibilities = torch.softmax(logits, dim=1)
        variance = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).square()
        denoised = torch.einsum('bk,bkd,kDd->bD', responsibilities, projections, self.bases) / (1 + variance)
        return denoised.reshape(batch_shape)

    def denoise(self, x, sigma, step=None):
        """The sampler's denoiser interface (x, sigma, step) -> float64 D(x; sigma)."""
        return self(x, sigma)

#----------------------------------------------------------------------------

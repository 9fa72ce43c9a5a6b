"""Rank of the denoiser's Jacobian along a sampling trajectory (Zhang et al., "The Emergence of
Reproducibility and Consistency in Diffusion Models"; the generalizability study that follows it).

The rank of J = dD(x; sigma)/dx is its effective rank: the smallest k with

    sqrt(s_1^2 + ... + s_k^2) > 0.99 * sqrt(s_1^2 + ... + s_n^2)

for the singular values s_1 >= s_2 >= ... of J (n = C*H*W).

- Exact: the whole n x n Jacobian from batched vector-Jacobian products (torch.func.vmap over
  torch.func.vjp: one forward pass, the backward passes vectorized in chunks) and its SVD.
- Fast: a randomized range finder (Halko et al. 2011, Alg. 4.1) with Jacobian-vector products
  (forward mode), projected with vector-Jacobian products, plus a Hutchinson estimate of the energy
  the sketch missed. The sketch grows until that bound fixes the rank; a rank above about n/4 ends
  in the exact computation. The cost follows the rank rather than n.

Any denoiser works: a callable x -> D(x) on a [1, C, H, W] tensor that torch.func can transform,
e.g. a network of training/networks.py (networks loaded through training.checkpoint are rebuilt on
those classes; NVIDIA's pickled attention is an autograd.Function that torch.func rejects), the
optimal denoiser of a dataset, or a closed-form Gaussian-mixture denoiser.
"""

import torch

from training.sampling import generation
from training.sampling import sampler as sampler_lib

#----------------------------------------------------------------------------

ENERGY_FRACTION = 0.99

def energy_rank(singular_values, fraction=ENERGY_FRACTION, total_energy=None):
    """Smallest k with sqrt(s_1^2 + ... + s_k^2) > fraction * sqrt(total); total = sum of all s^2 by default.

    Returns None when the given values do not reach the fraction of `total_energy` (a sketch that
    missed too much), and 0 for a zero matrix.
    """
    energy = torch.as_tensor(singular_values, dtype=torch.float64).square().sort(descending=True).values.cumsum(dim=0).sqrt()
    total = energy[-1] if total_energy is None else torch.as_tensor(total_energy, dtype=torch.float64).sqrt()
    if total == 0:
        return 0
    above = (energy > fraction * total).nonzero()
    return int(above[0]) + 1 if len(above) else None

#----------------------------------------------------------------------------
# Jacobian products of a denoiser at one point, on flat vectors.

def _flat_function(denoise, x):
    shape = x.shape
    return lambda v: denoise(v.reshape(shape)).reshape(-1).to(torch.float64)

def jacobian_matrix(denoise, x, chunk_size=64):
    """The n x n Jacobian (float64) of x -> denoise(x) at x, from vmapped vector-Jacobian products."""
    f = _flat_function(denoise, x)
    x_flat = x.detach().reshape(-1)
    out, vjp_fn = torch.func.vjp(f, x_flat)
    basis = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
    rows = torch.func.vmap(vjp_fn, chunk_size=chunk_size)(basis)[0] # Row i = e_i^T J.
    return rows.to(torch.float64)

def jacobian_vector_products(denoise, x, vectors, chunk_size=64):
    """J @ vectors for vectors [n, k] (forward mode)."""
    f = _flat_function(denoise, x)
    x_flat = x.detach().reshape(-1)
    jvp = lambda v: torch.func.jvp(f, (x_flat,), (v.to(x_flat.dtype),))[1]
    return torch.func.vmap(jvp, chunk_size=chunk_size)(vectors.T).T.to(torch.float64)

def vector_jacobian_products(denoise, x, vectors, chunk_size=64):
    """vectors^T @ J for vectors [n, k] (reverse mode); returns [k, n]."""
    f = _flat_function(denoise, x)
    _out, vjp_fn = torch.func.vjp(f, x.detach().reshape(-1))
    return torch.func.vmap(vjp_fn, chunk_size=chunk_size)(vectors.T.contiguous())[0].to(torch.float64)

#----------------------------------------------------------------------------

def exact_jacobian_rank(denoise, x, fraction=ENERGY_FRACTION, chunk_size=64):
    """(rank, singular values) of the full Jacobian."""
    singular_values = torch.linalg.svdvals(jacobian_matrix(denoise, x, chunk_size))
    return energy_rank(singular_values, fraction), singular_values

def _orthonormal_extension(basis, vectors):
    """Orthonormal columns spanning `vectors` minus their part in span(basis) (basis: orthonormal columns)."""
    for _ in range(2): # Twice: one projection leaves rounding-level components along `basis`.
        vectors = vectors - basis @ (basis.T @ vectors)
        vectors = torch.linalg.qr(vectors).Q
    return vectors

def fast_jacobian_rank(denoise, x, fraction=ENERGY_FRACTION, initial_size=32, oversampling=10, num_probes=16,
    safety=4, max_sketch_fraction=0.25, chunk_size=64, generator=None):
    """(rank, leading singular values) from a growing randomized sketch of the Jacobian.

    The sketch Y = J Omega (JVPs) gives an orthonormal basis Q of (most of) the range of J, and
    B = Q^T J (VJPs) has singular values that are lower bounds of the leading ones of J. The energy
    J has outside span(Q) is estimated from `num_probes` fresh JVPs. The rank is accepted when
    `safety` times that estimate cannot move the 0.99-energy crossing and the sketch is at least
    `oversampling` wider than the rank; otherwise the sketch grows (keeping what it has), at least
    doubling. Once it would exceed `max_sketch_fraction` of the n dimensions, the n VJPs of the
    exact Jacobian are cheaper (a JVP costs 2-3 VJPs on CPU) and the exact rank is returned.
    """
    n = x.numel()
    gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    randn = lambda k: torch.randn([n, k], generator=gen, dtype=torch.float64, device=x.device)
    basis = torch.zeros([n, 0], dtype=torch.float64, device=x.device)
    projected = torch.zeros([0, n], dtype=torch.float64, device=x.device)
    size = max(min(initial_size, n), 1)
    while size <= max_sketch_fraction * n:
        extension = _orthonormal_extension(basis, jacobian_vector_products(denoise, x, randn(size - basis.shape[1]), chunk_size))
        basis = torch.cat([basis, extension], dim=1)
        projected = torch.cat([projected, vector_jacobian_products(denoise, x, extension, chunk_size)])
        singular_values = torch.linalg.svdvals(projected)

        # Energy outside the sketch: E||(I - Q Q^T) J g||^2 = ||(I - Q Q^T) J||_F^2 for Gaussian g.
        probes = jacobian_vector_products(denoise, x, randn(num_probes), chunk_size)
        outside = (probes - basis @ (basis.T @ probes)).square().sum() / num_probes
        captured = singular_values.square().sum()
        missed = safety * outside
        if captured + missed == 0: # J = 0 along every direction tried.
            return 0, singular_values
        rank = energy_rank(singular_values, fraction, total_energy=captured + missed)
        if rank is not None and rank + oversampling <= size:
            # Each partial sum of J's squared singular values lies in [energy_k, energy_k + missed]
            # and their total in [captured, captured + missed]; the rank is certain if the crossing
            # happens at `rank` for every value in those ranges.
            energy = singular_values.square().cumsum(dim=0)
            reached = energy[rank - 1] > fraction ** 2 * (captured + missed)
            not_before = rank == 1 or energy[rank - 2] + missed <= fraction ** 2 * captured
            if reached and not_before:
                return rank, singular_values

        # Grow: at least double, and by as many directions as the energy still missing would need if
        # each held as much as the weakest one found so far (the rest of the spectrum is below it).
        missing = fraction ** 2 * (captured + outside) - captured
        weakest = singular_values[-1].square()
        needed = int(min(missing / weakest, n)) + oversampling if missing > 0 and weakest > 0 else 0
        size = max(2 * size, size + needed)
    return exact_jacobian_rank(denoise, x, fraction, chunk_size)

#----------------------------------------------------------------------------
# The trajectory.

def sampling_trajectory(net, latents, class_labels=None, randn_like=torch.randn_like, **sampler_kwargs):
    """[(x, sigma)] at which EDM's sampler evaluates the denoiser first in each step.

    These are the points x_i at the noise levels t_i of the trajectory (the Heun corrections are
    not included). `net` is anything with the preconditioned-network interface.
    """
    points = []
    def record(x, sigma, step, _denoised):
        if len(points) == step:
            points.append((x.detach().clone(), float(sigma)))
    denoise = generation.compose(net, class_labels, observe_network=record)
    with torch.no_grad():
        sampler_lib.edm_sampler(net, latents, class_labels, randn_like=randn_like, denoise=denoise, **sampler_kwargs)
    return points

def network_function(net, sigma, class_labels=None):
    """x -> D(x; sigma) of a preconditioned network at a fixed noise level, as a torch.func-able function.

    The class label is passed on: the original code samples the trajectory with the label but
    differentiates the network without it, i.e. the unconditional output of a conditional network.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return lambda x: net(x, sigma.to(x.device), class_labels).to(torch.float64)

def trajectory_jacobian_ranks(net, latents, class_labels=None, fast=False, fraction=ENERGY_FRACTION, chunk_size=64,
    seed=0, callback=None, **sampler_kwargs):
    """Sample one trajectory and return [{'step', 'sigma', 'snr', 'rank'}] for its steps.

    `callback(entry)` is called as each step is done (the CLI prints from it).
    """
    results = []
    gen = torch.Generator(device=latents.device).manual_seed(seed)
    for step, (x, sigma) in enumerate(sampling_trajectory(net, latents, class_labels, **sampler_kwargs)):
        denoise = network_function(net, sigma, class_labels)
        if fast:
            # The rank changes gradually along the trajectory: start from a sketch that would have fit the last one.
            initial_size = 32 if not results else max(32, int(1.5 * results[-1]['rank']) + 10)
            rank, _ = fast_jacobian_rank(denoise, x, fraction, initial_size=initial_size, chunk_size=chunk_size, generator=gen)
        else:
            rank, _ = exact_jacobian_rank(denoise, x, fraction, chunk_size=chunk_size)
        entry = dict(step=step, sigma=sigma, snr=1 / sigma, rank=rank)
        results.append(entry)
        if callback is not None:
            callback(entry)
    return results

#----------------------------------------------------------------------------

def plot_ranks(results, path, title=None, dim=None):
    """Rank against SNR 1/sigma (log axis) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import dnnlib

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r['snr'] for r in results], [r['rank'] for r in results], marker='o')
    ax.set_xscale('log')
    ax.set_xlabel('SNR 1/sigma')
    ax.set_ylabel(f'rank of the Jacobian{f" (of {dim})" if dim else ""}')
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png')
    plt.close(fig)

#----------------------------------------------------------------------------

"""Image generation as an iterator of batches; generate.py only parses flags and saves what it yields.

Seeds are split over ranks and batches exactly as NVIDIA EDM's generate.py does, and every random
number of an image comes from its own seed's generator, so an image depends only on its seed.
"""

import dataclasses
import os
import re

import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training import bundled
from training import checkpoint
from training.sampling import denoisers
from training.guidance import discriminator_guidance as dg_lib
from training.sampling import epsilon_scaling
from training import molrg
from training import run_record
from training.sampling import optimal_denoiser as optimal_denoiser_lib
from training.sampling import sampler as sampler_lib

#----------------------------------------------------------------------------
# Seed lists such as '0-63,100'.

def parse_seeds(spec):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]; ValueError with a readable reason otherwise."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    seeds = []
    for part in str(spec).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f'range "{part}" is empty: the end must not be smaller than the start')
            seeds.extend(range(lo, hi + 1))
        elif re.fullmatch(r'\d+', part):
            seeds.append(int(part))
        else:
            raise ValueError(f'"{part}" is not a seed or a range like 0-63')
    return seeds

def format_seeds(seeds):
    """[0, 1, 2, 5] -> '0-2,5', the inverse of parse_seeds."""
    parts, start, prev = [], None, None
    for seed in list(seeds) + [None]:
        if seed is not None and prev is not None and seed == prev + 1:
            prev = seed
            continue
        if start is not None:
            parts.append(f'{start}' if start == prev else f'{start}-{prev}')
        start = prev = seed
    return ','.join(parts)

def rank_batches(seeds, max_batch_size, rank=0, world_size=1):
    """This rank's share of `seeds`, as a list of int64 tensors of at most max_batch_size seeds."""
    if len(seeds) == 0:
        return []
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    all_batches = torch.as_tensor(seeds).tensor_split(num_batches)
    return [batch for batch in all_batches[rank::world_size] if len(batch) > 0]

def seeds_to_do(seeds, outdir, subdirs=False, npz=False):
    """The seeds of `seeds`, in their order, whose output is not yet in outdir (for --resume): a PNG
    that does not decode (a killed write) counts as missing; with `npz`, the seeds recorded in its
    samples_*.npz files are done. ValueError for an .npz file that cannot be matched to seeds."""
    if npz:
        done = seeds_in_npz_files(outdir)
        return [seed for seed in seeds if seed not in done]
    return [seed for seed in seeds if not image_decodes(image_path(outdir, seed, subdirs))]

#----------------------------------------------------------------------------
# What to sample (or measure) with.

def load_denoiser(network_pkl=None, molrg_path=None, optimal_denoiser=False, dataset_path=None, class_idx=None):
    """(denoiser, the file it came from), for the flags generate.py and jacobian.py share.

    A network pickle (default: the bundled digits model), the exact denoiser of a MoLRG dataset
    file, or the optimal denoiser of a dataset. ValueError for flags that contradict each other;
    checkpoint.CheckpointError and dataset.DatasetError from loading.
    """
    if optimal_denoiser and molrg_path is not None:
        raise ValueError('--optimal_denoiser and --molrg are two different denoisers; give one')
    if optimal_denoiser:
        if dataset_path is None:
            raise ValueError('--optimal_denoiser needs --dataset=ZIP|DIR, the images it denoises towards')
        if network_pkl is not None: # The original needs --network here; accept it for the same command line.
            dist.print0('Note: --network is not used with --optimal_denoiser; image size and channels come from --dataset')
        dist.print0(f'Loading optimal denoiser images from "{dataset_path}"...')
        return optimal_denoiser_lib.OptimalDenoiser.from_dataset(dataset_path), dataset_path
    if molrg_path is not None:
        if network_pkl is not None or dataset_path is not None:
            raise ValueError('--molrg replaces the network; leave out --network and --dataset')
        dist.print0(f'Loading MoLRG denoiser from "{molrg_path}"...')
        # Unconditional unless a class is asked for, so that a seed gives the trajectory an unconditional network would.
        return molrg.MoLRGDenoiser.from_file(molrg_path, conditional=(class_idx is not None)), molrg_path
    if dataset_path is not None:
        raise ValueError('--dataset is only used with --optimal_denoiser')
    if network_pkl is None:
        network_pkl = bundled.NETWORK
        if not os.path.isfile(network_pkl):
            raise ValueError(f'No --network given and the bundled default {network_pkl} is missing')
    dist.print0(f'Loading network from "{network_pkl}"...')
    return checkpoint.load_network(network_pkl, verbose=(dist.get_rank() == 0)), network_pkl

#----------------------------------------------------------------------------
# Output file names.

def image_path(outdir, seed, subdirs=False):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')

def save_image(path, image):
    """Write one HWC uint8 image as PNG atomically."""
    mode = 'L' if image.shape[2] == 1 else 'RGB'
    with dnnlib.util.atomic_write(path) as f:
        PIL.Image.fromarray(image[:, :, 0] if mode == 'L' else image, mode).save(f, format='PNG')

def npz_path(outdir, seeds):
    """One .npz per batch, named after its seeds (`samples_*.npz`, the pattern npz-based tools glob for)."""
    return os.path.join(outdir, f'samples_{seeds[0]:06d}-{seeds[-1]:06d}.npz')

def save_npz(path, images, labels=None, label_dim=0, seeds=None):
    """Write uint8 NHWC images as `samples` and, for class-conditional networks, one-hot float32 `label`
    (as the discriminator-guidance code writes its samples), atomically. `seeds` (int64) records
    which seeds the file holds, for --resume; tools that read `samples` ignore it."""
    arrays = dict(samples=np.asarray(images, dtype=np.uint8))
    if labels is not None:
        arrays['label'] = np.eye(label_dim, dtype=np.float32)[np.asarray(labels)]
    if seeds is not None:
        arrays['seeds'] = np.asarray(seeds, dtype=np.int64)
    with dnnlib.util.atomic_write(path) as f:
        np.savez(f, **arrays)

def seeds_in_npz_files(outdir):
    """The seeds recorded in outdir's samples_*.npz files (a set; empty if there are none).

    ValueError for a file without a `seeds` record, whose contents cannot be matched to seeds.
    """
    done = set()
    if not os.path.isdir(outdir):
        return done
    for fname in sorted(os.listdir(outdir)):
        if not re.fullmatch(r'samples_.*\.npz', fname):
            continue
        path = os.path.join(outdir, fname)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if 'seeds' not in npz.files:
                    raise ValueError(f'{path} does not record its seeds, so --resume cannot tell which are done; move it out of --outdir')
                done.update(int(seed) for seed in npz['seeds'])
        except ValueError as e:
            if 'does not record its seeds' in str(e):
                raise
            raise ValueError(f'{path} is not a readable .npz file ({e}); a killed write? Remove it and run again') from e
        except Exception as e: # BadZipFile, EOFError, OSError: a damaged file.
            raise ValueError(f'{path} is not a readable .npz file ({type(e).__name__}); a killed write? Remove it and run again') from e
    return done

def load_image(path):
    """PNG -> HWC uint8 array (grayscale as one channel)."""
    image = np.asarray(PIL.Image.open(path))
    return image[:, :, None] if image.ndim == 2 else image

def image_decodes(path):
    """Does `path` hold a complete image? (--resume regenerates the ones that do not.)"""
    if not os.path.isfile(path):
        return False
    try:
        with PIL.Image.open(path) as image:
            image.load()
        return True
    except Exception: # PIL's errors for truncated or foreign bytes vary (OSError, SyntaxError, ValueError).
        return False

def save_batch(batch, outdir, subdirs=False, npz=False, label_dim=0):
    """Write one batch of generate_images(): a PNG per seed, or with `npz` one samples_*.npz file."""
    if npz:
        save_npz(npz_path(outdir, batch.seeds), batch.images, batch.labels, label_dim, seeds=batch.seeds)
        return
    for seed, image in zip(batch.seeds, batch.images):
        save_image(image_path(outdir, seed, subdirs), image)

def save_image_grid(path, images, grid_width=None, spacing=None, background=255):
    """Tile N HWC uint8 images into one PNG, grid_width images per row (default: square-ish), with
    `spacing` pixels of `background` between them (default: 1 px below 32 px images, else 2 px)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    gw = grid_width if grid_width is not None else int(np.ceil(np.sqrt(n)))
    gh = int(np.ceil(n / gw))
    pad = spacing if spacing is not None else (1 if max(h, w) < 32 else 2)
    canvas = np.full([gh * h + (gh - 1) * pad, gw * w + (gw - 1) * pad, c], background, dtype=np.uint8)
    for k in range(n):
        y, x = divmod(k, gw)
        top, left = y * (h + pad), x * (w + pad)
        canvas[top:top + h, left:left + w] = images[k]
    save_image(path, canvas)

GRID_SEEDS = 256 # A grid shows at most this many images, the first seeds.

def grid_path(outdir, grid=None, num_seeds=0, write_default=True):
    """Where the grid goes: `grid` if given, else <outdir>-grid.png beside the image folder when
    `write_default` and there are at most GRID_SEEDS seeds; None for no grid. ValueError for a grid
    inside outdir, which must hold the images only."""
    path = grid if grid is not None else (run_record.beside(outdir, '-grid.png') if write_default and num_seeds <= GRID_SEEDS else None)
    grid_folder, image_folder = os.path.dirname(os.path.abspath(path or '.')), os.path.abspath(outdir)
    if path is not None and (grid_folder == image_folder or grid_folder.startswith(image_folder + os.sep)):
        raise ValueError(f'--grid={grid} is inside --outdir, which must hold the images only; put the grid beside it')
    return path

def save_grid(path, outdir, seeds, subdirs=False):
    """Tile the saved images of the first GRID_SEEDS of `seeds` into the PNG at `path`."""
    save_image_grid(path, [load_image(image_path(outdir, seed, subdirs)) for seed in seeds[:GRID_SEEDS]])

#----------------------------------------------------------------------------

def to_uint8(images):
    """[-1, 1] float NCHW -> uint8 NHWC numpy, rounded as EDM does."""
    return misc.model_range_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()

def class_labels_for_seeds(net, rnd, batch_size, class_idx=None, device=None):
    """One-hot labels: drawn from each seed's generator, or all `class_idx`; None if unconditional."""
    if not net.label_dim:
        return None
    labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch_size], device=device)]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels

def check_class(net, class_idx):
    """ValueError for a --class the network does not have."""
    if class_idx is not None and class_idx >= net.label_dim:
        raise ValueError(f'--class={class_idx} is out of range: the network has {net.label_dim} classes' if net.label_dim
            else f'--class={class_idx} given, but the network is unconditional')

def min_eval_batch(device):
    """Smallest batch the network is evaluated at, so that an image never depends on its batch.

    CPU matrix products give per-row results that depend on the number of rows when it is small
    (the BLAS switches kernels and thread partitions; measured: up to about 1.6 x threads rows),
    and batch-1 convolutions take another algorithm. Short batches are therefore padded with
    throw-away samples up to this size. Larger batches are already in the stable regime, which is
    also where NVIDIA EDM's own batches are, so this keeps its images too. On GPUs no padding
    (1): cuDNN picks its algorithms per shape anyway, and the padded samples would cost GPU time.
    """
    return max(16, 4 * torch.get_num_threads()) if torch.device(device).type == 'cpu' else 1

def uses_ablation_sampler(sampler_kwargs):
    """EDM's rule: any of --solver/--disc/--schedule/--scaling selects the generalized sampler."""
    return sampler_lib.uses_ablation_sampler(sampler_kwargs)

#----------------------------------------------------------------------------
# The denoiser of a run: every tool that samples builds it here (training/sampling/denoisers.py says what
# a denoiser is).

@dataclasses.dataclass(frozen=True)
class Corrections:
    """The exposure-bias corrections of a run, as generate.py's flags give them."""
    eps_scaler: float = 1.0           # Epsilon scaling (training/sampling/epsilon_scaling.py): lambda_i = eps_scaler + kappa * i.
    kappa: float = 0.0
    guidance: object = None           # discriminator_guidance.DiscriminatorGuidance, or None.
    guidance_cond: bool = False       # The discriminator takes the class labels.
    dg_weight_1st_order: float = 0.0
    dg_weight_2nd_order: float = 0.0
    boosting: bool = False            # DG's boosting; a fresh state per composed denoiser (per batch).

def compose(net, class_labels=None, corrections=Corrections(), observe_network=None):
    """The denoiser of `net` with `corrections`, in SEDM-G++'s order:

        network -> epsilon scaling -> discriminator guidance

    so that guidance's term is added to the scaled denoiser and not scaled itself. Corrections that
    are off add nothing (the result is then bit-identical to the plain network's).
    observe_network(x, sigma, step, denoised) -- optional; sees the network's own output, before
    any correction (the eps-norm measurements record it).
    """
    denoise = denoisers.network(net, class_labels)
    if observe_network is not None:
        denoise = denoisers.observed(denoise, observe_network)
    denoise = epsilon_scaling.with_epsilon_scaling(denoise, corrections.eps_scaler, corrections.kappa)
    if corrections.guidance is not None:
        denoise = dg_lib.with_discriminator_guidance(denoise, corrections.guidance, class_labels if corrections.guidance_cond else None,
            corrections.dg_weight_1st_order, corrections.dg_weight_2nd_order, boosting=dg_lib.Boosting() if corrections.boosting else None)
    return denoisers.as_denoiser(denoise)

#----------------------------------------------------------------------------

def generate_images(net, seeds, max_batch_size=64, class_idx=None, device=torch.device('cpu'), sampler_kwargs={},
    make_denoiser=None, rank=0, world_size=1, corrections=None):
    """Yield EasyDict(seeds, images, labels) per batch of this rank: uint8 NHWC numpy images.

    sampler_kwargs -- arguments of edm_sampler / ablation_sampler; None values mean default.
    corrections    -- optional Corrections: the denoiser of each batch is compose(net, labels, corrections).
    make_denoiser  -- optional (net, class_labels) -> denoiser instead; default: the network itself.
    """
    if corrections is not None:
        assert make_denoiser is None
        make_denoiser = lambda net, class_labels: compose(net, class_labels, corrections)
    sampler_kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    for batch_seeds in rank_batches(seeds, max_batch_size, rank, world_size):
        batch_seeds = [int(seed) for seed in batch_seeds]
        batch_size = len(batch_seeds)
        eval_seeds = batch_seeds + [batch_seeds[-1]] * max(min_eval_batch(device) - batch_size, 0) # Padding, see min_eval_batch().
        rnd = sampler_lib.StackedRandomGenerator(device, eval_seeds)
        latents = rnd.randn([len(eval_seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        class_labels = class_labels_for_seeds(net, rnd, len(eval_seeds), class_idx, device)
        denoise = make_denoiser(net, class_labels) if make_denoiser is not None else None
        with torch.no_grad():
            images = sampler_lib.run_settings(net, latents, class_labels, randn_like=rnd.randn_like, denoise=denoise, sampler_kwargs=sampler_kwargs)
        labels = class_labels[:batch_size].argmax(dim=1).cpu().numpy() if class_labels is not None else None
        yield dnnlib.EasyDict(seeds=batch_seeds, images=to_uint8(images[:batch_size]), labels=labels)

#----------------------------------------------------------------------------

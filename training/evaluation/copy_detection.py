"""SSCD copy-detection descriptors and the reproducibility / memorization scores built on them.

Zhang et al., "The Emergence of Reproducibility and Consistency in Diffusion Models" measure with
SSCD (Pizzi et al. 2022, a ResNet descriptor for image copy detection) how often two models produce
the same image from the same noise (reproducibility, RP) and how often a model reproduces a training
image (memorization). Images are resized to 320x320 and normalized with the ImageNet statistics,
as their code does through torchvision; descriptors are L2-normalized so that a dot product is the
cosine similarity.

- RP score: the fraction of index-matched pairs (source_i, target_i) with cosine similarity > t.
- M score:  1 - the fraction of source images whose most similar target has similarity > t.

The M score compares every source with every target. It is computed in blocks of matrix products
and never holds the full similarity matrix, so 100k x 100k works in a few hundred MiB.
"""

import numpy as np
import PIL.Image
import torch
import tqdm

from torch_utils import distributed as dist
from torch_utils import misc
from training import dataset as dataset_lib
from training.evaluation import feature_detectors

#----------------------------------------------------------------------------

SSCD_URL = 'https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt'
SSCD_RESOLUTION = 320
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_THRESHOLD = 0.6

#----------------------------------------------------------------------------
# Model input.

def resize_for_sscd(image, resolution=SSCD_RESOLUTION):
    """uint8 CHW image -> uint8 3 x 320 x 320, resized by Pillow's bilinear filter.

    That is what torchvision's Resize does to a PIL image, as in the original pipeline, so the
    pixels (and descriptors) are the same. Grayscale is repeated to RGB (the original fails on it).
    """
    image = np.asarray(image)
    if image.shape[0] == 1:
        image = image.repeat(3, axis=0)
    pil = PIL.Image.fromarray(image.transpose(1, 2, 0), 'RGB')
    if pil.size != (resolution, resolution):
        pil = pil.resize((resolution, resolution), PIL.Image.BILINEAR)
    return np.asarray(pil).transpose(2, 0, 1)

def normalize_for_sscd(images):
    """uint8 [N, 3, H, W] -> float32 ImageNet-normalized input."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).reshape(1, 3, 1, 1)
    return (images.to(torch.float32) / 255 - mean) / std

def sscd_input(images):
    """uint8 [N, C, H, W] images -> the float32 [N, 3, 320, 320] input of SSCD models."""
    resized = np.stack([resize_for_sscd(image) for image in images.cpu().numpy()])
    return normalize_for_sscd(torch.from_numpy(resized).to(images.device))

#----------------------------------------------------------------------------
# The model.

def l2_normalize(features):
    """Rows scaled to unit length (rows of zeros stay zero)."""
    features = torch.as_tensor(features)
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)

class SSCDModel:
    """A TorchScript SSCD model (or any module with its interface): normalized float images -> [N, D]."""
    def __init__(self, module, source):
        self.module = module
        self.source = source
        try:
            features = self(sscd_input(feature_detectors.probe_images([3, 8, 8], device=self.device)))
        except feature_detectors.DetectorError:
            raise
        except Exception as e: # Whatever the network raises for input it cannot take.
            raise feature_detectors.DetectorError(f'SSCD model {source} fails on images of 3x{SSCD_RESOLUTION}x{SSCD_RESOLUTION} '
                f'({feature_detectors.short_reason(e)}); is it an SSCD TorchScript model?') from e
        self.feature_dim = features.shape[1]

    @property
    def device(self):
        return misc.module_device(self.module)

    def __call__(self, images):
        """Normalized float32 [N, 3, 320, 320] -> L2-normalized float32 [N, D] descriptors."""
        with torch.no_grad():
            features = self.module(images)
        n = images.shape[0]
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != n or not features.is_floating_point():
            got = f'a tensor of shape {list(features.shape)}' if isinstance(features, torch.Tensor) else f'a {type(features).__name__}'
            raise feature_detectors.DetectorError(f'SSCD model {self.source} returned {got} for {n} images; expected [N, D] descriptors')
        return l2_normalize(features.to(torch.float32))

def load_sscd_model(path_or_url=SSCD_URL, device=torch.device('cpu'), verbose=True):
    """Load a TorchScript SSCD model (path or URL) and check it with a dry run; DetectorError otherwise."""
    module = feature_detectors.load_torch_module(path_or_url, what='SSCD model', device=device, verbose=verbose)
    return SSCDModel(module, path_or_url)

FEATURE_CHUNK_BYTES = 256 << 20 # Device memory for features on their way to host memory, and per all-reduce.

def sscd_features(model, dataset, batch_size=64, num_workers=2, device=torch.device('cpu'), progress=True, chunk_bytes=FEATURE_CHUNK_BYTES):
    """float32 [N, D] L2-normalized descriptors of all images of `dataset`, in dataset order, on every
    rank, in host memory.

    The full matrix lives in host memory only (ImageNet's 1.28M x 512 features are 2.6 GB): the
    device holds at most chunk_bytes of finished features before they are copied out, and the sum
    over ranks runs chunk by chunk of rows. Each row is filled by exactly one rank and the others
    add zeros, so the chunking changes no number.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    features = torch.zeros([len(dataset), model.feature_dim], dtype=torch.float32)
    rows_per_chunk = max(chunk_bytes // (4 * model.feature_dim), 1)
    batches = dataset_lib.rank_batch_indices(len(dataset), batch_size, rank, world_size)
    loader = dataset_lib.iterate_image_batches(dataset, batch_size, rank, world_size, num_workers=num_workers)
    pending_indices, pending_features = [], []
    def copy_out():
        if pending_indices:
            features[torch.cat(pending_indices)] = torch.cat(pending_features).cpu()
            pending_indices.clear(), pending_features.clear()
    # Resizing here rather than in the loader's workers costs little next to the network.
    for indices, (images, _labels) in zip(batches, tqdm.tqdm(loader, total=len(batches), unit='batch', disable=(not progress or rank != 0))):
        pending_indices.append(indices)
        pending_features.append(model(sscd_input(images.to(device))).to(torch.float32))
        if sum(len(i) for i in pending_indices) >= rows_per_chunk:
            copy_out()
    copy_out()
    if world_size > 1:
        reduce_device = device if torch.device(device).type == 'cuda' else torch.device('cpu') # NCCL reduces device tensors only.
        for rows in features.split(rows_per_chunk):
            rows.copy_(dist.all_reduce_sum(rows.to(reduce_device)).cpu())
    return features

#----------------------------------------------------------------------------
# Scores.

def reproducibility_score(source, target, threshold=DEFAULT_THRESHOLD):
    """Fraction of index-matched pairs whose cosine similarity exceeds `threshold`."""
    source, target = torch.as_tensor(source, dtype=torch.float64), torch.as_tensor(target, dtype=torch.float64)
    if source.shape != target.shape:
        raise ValueError(f'RP score compares image i of one set with image i of the other, but the feature sets have shapes '
            f'{list(source.shape)} and {list(target.shape)}')
    similarity = (l2_normalize(source) * l2_normalize(target)).sum(dim=1)
    return float((similarity > threshold).to(torch.float64).mean())

def max_cosine_similarity(source, target, block_size=4096, progress=False):
    """For each source row, the largest cosine similarity to any target row: float32 [N_source].

    Blocks of block_size x block_size similarities are computed by float32 matrix products and
    reduced at once. Rows are normalized block by block as they are used (a row's normalization
    does not depend on its neighbours), so beyond the inputs themselves the memory use is
    O(block_size^2 + block_size * D), never another copy of the whole feature matrices.
    """
    source, target = torch.as_tensor(source), torch.as_tensor(target)
    unit_rows = lambda rows: l2_normalize(rows.to(torch.float64)).to(torch.float32)
    best = torch.full([source.shape[0]], -float('inf'), dtype=torch.float32)
    source_blocks = list(range(0, source.shape[0], block_size))
    for start in tqdm.tqdm(source_blocks, unit='block', disable=not progress):
        rows = unit_rows(source[start:start + block_size])
        for t_start in range(0, target.shape[0], block_size):
            block = rows @ unit_rows(target[t_start:t_start + block_size]).T
            best[start:start + block_size] = torch.maximum(best[start:start + block_size], block.max(dim=1).values)
    return best

def count_matched(source, target, threshold=DEFAULT_THRESHOLD, block_size=4096, progress=False):
    """Number of source rows with some target row of cosine similarity > threshold.

    The float32 blocks decide every row whose best similarity is clearly above or below the
    threshold; rows within float32 rounding of it are decided again in float64, so the count is
    that of exact arithmetic.
    """
    best = max_cosine_similarity(source, target, block_size, progress)
    tolerance = 1e-4 # Far above the float32 error of a dot product of unit vectors of a few thousand entries.
    close = ((best - threshold).abs() <= tolerance).nonzero().flatten()
    matched = best > threshold
    if len(close):
        source64 = l2_normalize(torch.as_tensor(source)[close].to(torch.float64))
        target = torch.as_tensor(target)
        best64 = torch.full([len(close)], -float('inf'), dtype=torch.float64)
        for t_start in range(0, target.shape[0], block_size):
            target64 = l2_normalize(target[t_start:t_start + block_size].to(torch.float64))
            best64 = torch.maximum(best64, (source64 @ target64.T).max(dim=1).values)
        matched[close] = best64 > threshold
    return int(matched.sum())

def memorization_score(source, target, threshold=DEFAULT_THRESHOLD, block_size=4096, progress=False):
    """1 - the fraction of source images whose nearest target has cosine similarity > threshold."""
    source, target = torch.as_tensor(source), torch.as_tensor(target)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f'Feature sets of shapes {list(source.shape)} and {list(target.shape)} cannot be compared; '
            f'both must be [N, D] descriptors of the same model')
    if len(source) == 0 or len(target) == 0:
        raise ValueError('M score needs at least one source and one target image')
    return 1 - count_matched(source, target, threshold, block_size, progress) / len(source)

#----------------------------------------------------------------------------
# Feature files: .npz with `features` [N, D].

FEATURES_KEY = 'features'

def load_features(path):
    """float32 [N, D] features from an .npz file; ValueError with a one-line message otherwise."""
    try:
        with np.load(path) as npz:
            if FEATURES_KEY not in npz.files:
                raise ValueError(f'{path} has no "{FEATURES_KEY}" array (it has: {", ".join(npz.files) or "nothing"}); '
                    f'make feature files with "sscd.py feature"')
            features = npz[FEATURES_KEY]
    except (FileNotFoundError, IsADirectoryError) as e:
        raise ValueError(f'Feature file not found: {path}') from e
    except (OSError, EOFError) as e:
        raise ValueError(f'Cannot read {path} as an .npz file ({e})') from e
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f'Cannot read {path} as an .npz file ({e})') from e
    if features.ndim != 2 or features.dtype.kind != 'f':
        raise ValueError(f'"{FEATURES_KEY}" in {path} is {features.dtype} of shape {list(features.shape)}; expected float [N, D]')
    return features

#----------------------------------------------------------------------------

"""Image feature networks loaded from a file or URL: the Inception-v3 of FID and the SSCD copy detector.

A detector file is either a TorchScript archive (`torch.jit.save`, a zip) or a pickled torch module
(`pickle.dump`, as the StyleGAN3/EDM metrics pickle `inception-2015-12-05.pkl`). Which of the two it
is comes from the file's first bytes, not from its name. After loading, a dry run on a small batch
of the images' actual shape checks that the network does what the caller needs, so a wrong file is
reported in one line before any real work starts.

Resize policy: images are given to the FID detector as they are stored (uint8 NCHW, grayscale
repeated to 3 channels, as EDM does). EDM's Inception network resizes its input to 299x299 itself,
so any resolution works with it; a custom detector that does not resize must be given images of the
size it was built for, and the dry run says so when it cannot take them.
"""

import hashlib
import io
import inspect
import os
import pickle

import torch

import dnnlib
from torch_utils import misc
from training import bundled
from training import safety

#----------------------------------------------------------------------------

# EDM's Inception-v3 feature network (a PyTorch port of TensorFlow's inception-2015-12-05).
INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

class DetectorError(Exception):
    """A detector file that cannot be used; the message is one line meant for the user as is."""

def short_reason(error):
    """The last line of an exception's message: TorchScript errors carry their whole traceback."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__

#----------------------------------------------------------------------------

def load_torch_module(path_or_url, what='detector', device=torch.device('cpu'), verbose=True):
    """Load a TorchScript archive or a pickled torch.nn.Module, in eval mode without gradients.

    `what` names the file in error messages ("detector", "SSCD model").
    """
    return load_torch_module_and_hash(path_or_url, what, device, verbose)[0]

def load_torch_module_and_hash(path_or_url, what='detector', device=torch.device('cpu'), verbose=True):
    """(module, sha256 hex digest of the file's bytes): the hash is the file's identity in reference statistics."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        raise DetectorError(f'{what[:1].upper() + what[1:]} file not found: {path_or_url}') from e # 'SSCD model', not 'Sscd model'.
    except dnnlib.util.DownloadError as e:
        raise DetectorError(f'Could not get the {what}: {e}') from e

    sha256 = hashlib.sha256(data).hexdigest()
    if data[:4] == b'PK\x03\x04': # Zip archive: TorchScript (torch.save files are zips too, but hold no code).
        try:
            module = torch.jit.load(io.BytesIO(data), map_location=device)
        except Exception as e: # torch.jit.load reports bad archives with assorted exception types.
            raise DetectorError(f'{path_or_url} is a zip file but not a TorchScript archive ({short_reason(e)}); '
                f'save the {what} with torch.jit.save(torch.jit.script(model), path)') from e
    elif data[:6] == b'\x93NUMPY':
        raise DetectorError(f'{path_or_url} is a .npy array, expected a TorchScript archive or a pickled torch module')
    else:
        safety.warn_code_executes(path_or_url, what)
        try:
            module = pickle.loads(data)
        except Exception as e: # Anything unpicklable fails in its own way; all mean "not a module pickle".
            raise DetectorError(f'{path_or_url} is neither a TorchScript archive nor a pickled torch module '
                f'({type(e).__name__}: {short_reason(e)})') from e
        if not isinstance(module, torch.nn.Module):
            raise DetectorError(f'{path_or_url} holds a pickled {type(module).__name__}, not a torch module')
        module = module.to(device)
    module.eval()
    for param in module.parameters(): # ScriptModules have no requires_grad_().
        param.requires_grad_(False)
    return module, sha256

def accepts_keyword(module, name):
    """Does module.forward take an argument called `name` (TorchScript or Python)?"""
    if isinstance(module, torch.jit.ScriptModule):
        return name in [arg.name for arg in module.forward.schema.arguments]
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False

def probe_images(image_shape, num=2, device=torch.device('cpu')):
    """A fixed batch of random uint8 NCHW images for dry runs."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, [num, *image_shape], generator=gen, dtype=torch.uint8).to(device)

#----------------------------------------------------------------------------

class FeatureDetector:
    """A loaded FID feature network: uint8 NCHW images in, float32 [N, D] features out.

    Called like EDM calls its Inception pickle, `module(images, return_features=True)`; modules
    whose forward() has no return_features argument are called with the images alone.
    """
    def __init__(self, module, source, image_shape):
        self.module = module
        self.source = source                    # Path or URL, for messages.
        self.image_shape = list(image_shape)    # [C, H, W] the dry run accepted.
        self.call_kwargs = dict(return_features=True) if accepts_keyword(module, 'return_features') else {}
        self.feature_dim = None
        self.feature_dim = self._dry_run()

    def _dry_run(self):
        c, h, w = self.image_shape
        images = probe_images(self.image_shape, device=self.device)
        try:
            features = self(images)
        except DetectorError:
            raise
        except Exception as e: # Whatever the network raises for input it cannot take.
            raise DetectorError(f'Detector {self.source} fails on uint8 images of {c}x{h}x{w} ({short_reason(e)}); '
                f'it must take uint8 NCHW images of this size (EDM\'s Inception resizes internally; a custom detector '
                f'may need images of its own input size, e.g. made with dataset_tool.py --resolution)') from e
        return features.shape[1]

    @property
    def device(self):
        return misc.module_device(self.module)

    def __call__(self, images):
        """uint8 [N, C, H, W] -> float32 [N, D]; grayscale is repeated to RGB as in EDM."""
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])
        with torch.no_grad():
            features = self.module(images.to(self.device), **self.call_kwargs)
        n = images.shape[0]
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != n or not features.is_floating_point():
            got = f'a tensor of shape {list(features.shape)} ({features.dtype})' if isinstance(features, torch.Tensor) else f'a {type(features).__name__}'
            raise DetectorError(f'Detector {self.source} returned {got} for {n} images; a feature detector must return an [N, D] float feature matrix')
        if self.feature_dim is not None and features.shape[1] != self.feature_dim:
            raise DetectorError(f'Detector {self.source} returned {features.shape[1]} features per image, earlier {self.feature_dim}')
        return features.to(torch.float32)

def load_feature_detector(path_or_url=INCEPTION_URL, image_shape=(3, 32, 32), device=torch.device('cpu'), verbose=True):
    """Load a FID feature detector and check with a dry run that it takes images of `image_shape` [C, H, W]."""
    c = image_shape[0]
    if c not in (1, 3):
        raise DetectorError(f'Images have {c} channels; feature detectors take RGB (3) or grayscale (1) images')
    module, sha256 = load_torch_module_and_hash(path_or_url, what='detector', device=device, verbose=verbose)
    detector = FeatureDetector(module, path_or_url, [3, *image_shape[1:]])
    detector.sha256 = sha256
    return detector

def default_detector(recorded=None):
    """The detector to use when the user names none: the bundled one if the reference statistics
    record its identity, else EDM's Inception. A reference never names a file to load; what it
    records is only checked against the detector used (training/evaluation/frechet.py check_detector)."""
    if recorded is not None and identity_name(recorded['name']) == os.path.basename(bundled.DETECTOR):
        return bundled.DETECTOR
    return INCEPTION_URL

def identity_name(path_or_url):
    """A detector's name in reference statistics: its file name (of a path or of a URL)."""
    return str(path_or_url).replace('\\', '/').rstrip('/').rsplit('/', 1)[-1]

#----------------------------------------------------------------------------

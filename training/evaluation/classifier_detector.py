"""A small classifier trained on a labelled dataset, exported as a feature detector for fid.py.

Inception-v3 features mean little for 16x16 handwritten digits, and its weights cannot be
downloaded offline. A classifier trained on the data itself gives features in which classes
separate; the Frechet distance in that space ("FD" rather than "FID") is what the bundled
exposure-bias study reports. The exported file is a TorchScript archive with the interface of
EDM's Inception pickle: `detector(uint8 NCHW images, return_features=True) -> [N, D] float32`.
"""

import warnings

import torch
import tqdm

import dnnlib
from torch_utils import misc

#----------------------------------------------------------------------------

class ClassifierDetector(torch.nn.Module):
    def __init__(self,
        resolution,             # Input resolution the classifier is trained at; other sizes are resized to it.
        num_classes,            # Number of classes.
        channels        = 16,   # Width of the first stage; doubled at the second.
        feature_dim     = 64,   # Dimensionality of the returned features.
    ):
        super().__init__()
        assert resolution % 4 == 0, 'resolution must be divisible by 4'
        self.resolution = resolution
        c = channels
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * c * (resolution // 4) ** 2, feature_dim), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        # uint8 RGB or grayscale in [0, 255]; colour is averaged away (fid.py repeats grayscale to RGB).
        x = misc.uint8_to_model_range(images.to(torch.float32).mean(dim=1, keepdim=True))
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            x = torch.nn.functional.interpolate(x, size=[self.resolution, self.resolution], mode='bilinear', antialias=True, align_corners=False)
        features = self.body(x)
        return features if return_features else self.head(features)

#----------------------------------------------------------------------------

def train_classifier_detector(images, labels, num_classes, epochs=20, batch_size=128, lr=2e-3, seed=0, progress=True):
    """Train on uint8 NCHW `images` with integer `labels`; returns (model in eval mode, train accuracy per epoch).

    Small random shifts (up to 1 pixel) keep it from memorizing the few images it sees.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClassifierDetector(resolution=images.shape[-1], num_classes=num_classes)
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    accuracies = []
    bar = tqdm.trange(epochs, desc='training detector', disable=not progress)
    for _epoch in bar:
        model.train()
        order = torch.randperm(len(images), generator=generator)
        correct = 0
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            shift = torch.randint(-1, 2, [2], generator=generator).tolist()
            batch = torch.roll(images[idx], shifts=shift, dims=[2, 3])
            logits = model(batch)
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(dim=1) == labels[idx]).sum())
        schedule.step()
        accuracies.append(correct / len(images))
        bar.set_postfix(loss=f'{loss.item():.3f}', acc=f'{accuracies[-1]:.3f}')
    return model.eval().requires_grad_(False), accuracies

def classifier_accuracy(model, images, labels, batch_size=512):
    with torch.no_grad():
        predictions = torch.cat([model(torch.as_tensor(images[i:i + batch_size])).argmax(dim=1) for i in range(0, len(images), batch_size)])
    return float((predictions == torch.as_tensor(labels)).to(torch.float64).mean())

def export_detector(model, path):
    """Save as a TorchScript archive (atomically), loadable by fid.py --detector."""
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is the format detectors
        # (EDM's Inception, SSCD) are distributed in, and what fid.py loads without our code.
        warnings.simplefilter('ignore', DeprecationWarning)
        scripted = torch.jit.script(model)
        with dnnlib.util.atomic_write(path, fsync=True) as f:
            torch.jit.save(scripted, f)

#----------------------------------------------------------------------------

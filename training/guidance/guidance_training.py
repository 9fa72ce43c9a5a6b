"""Training the two networks of discriminator guidance (training/guidance/discriminator_guidance.py).

- The discriminator (DG Sec. 4): real images (label 1) and the generator's samples (label 0) are
  diffused to a VP time t drawn by importance sampling (density beta(t) / std(t)^2); the frozen
  ADM classifier turns them into features, and the discriminator head on those features is
  trained with binary cross-entropy and Adam (DG's lr 3e-4, weight decay 1e-7).
- The noise-conditional feature classifier, for data sets without a public one: the same ADM
  encoder trained with cross-entropy on VP-perturbed images (t uniform, as ADM samples its
  timesteps). Without labels it learns a self-supervised task instead: which of the four
  rotations (0, 90, 180, 270 degrees) an image was given, so its features still have to
  recognize image content at every noise level.

Both write plain state dicts in guided-diffusion's layout, one per epoch, atomically, so DG's own
code and generate.py --discriminator_ckpt / --pretrained_classifier_ckpt read them alike.
"""

import os

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import misc
from training.guidance import adm_encoder
from training import dataset as dataset_lib
from training.guidance import discriminator_guidance as dg
from training import image_sources

#----------------------------------------------------------------------------

def load_image_set(path, need_labels=False, max_size=None):
    """(uint8 [N, C, H, W] tensor, labels) of a dataset zip/folder or .npz sample files.

    labels: int64 class indices [N], or None if need_labels is False. DatasetError if unusable.
    """
    data = image_sources.open_images(path, max_size=max_size, use_labels=need_labels)
    if len(data) == 0:
        raise dataset_lib.DatasetError(f'{path} holds no images')
    images = torch.from_numpy(np.stack([data[i][0] for i in tqdm.trange(len(data), desc=f'reading {os.path.basename(str(path).rstrip("/"))}',
        unit='img', disable=len(data) < 5000)]))
    labels = None
    if need_labels:
        labels = torch.from_numpy(np.stack([data.get_label(i) for i in range(len(data))])).argmax(dim=1)
    return images, labels

def has_class_labels(path):
    """Whether the images at path come with class labels (dataset.json, or `label` arrays in .npz files)."""
    return image_sources.open_images(path, max_size=1)._load_raw_labels() is not None

def save_state_dict(path, module):
    with dnnlib.util.atomic_write(path) as f:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, f)

def set_backend_flags():
    """The cuDNN / TF32 settings of EDM's training loop: autotuned convolutions, full float32 matmuls."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

class EpochMeans:
    """Sums of the loss and of the hits over an epoch, kept on the training device: reading a GPU
    value stalls the queue, so the sums are read once per log (every `log_every` batches), not per step."""
    def __init__(self, device, log_every=100):
        self.sums = torch.zeros([2], dtype=torch.float64, device=device)
        self.class_sums = None # [hits, count] x [generated, real], for the discriminator's balanced accuracy.
        self.count = 0
        self.log_every = log_every

    def add(self, loss, hits, num):
        self.sums += torch.stack([loss.detach().to(torch.float64) * num, hits.detach().to(torch.float64)])
        self.count += num

    def add_classes(self, correct, labels):
        """Per-class hits of a binary task (labels 0 = generated, 1 = real), for the balanced accuracy."""
        if self.class_sums is None:
            self.class_sums = torch.zeros([2, 2], dtype=torch.float64, device=self.sums.device)
        self.class_sums[0].index_add_(0, labels.long(), correct.detach().to(torch.float64))
        self.class_sums[1].index_add_(0, labels.long(), torch.ones_like(correct, dtype=torch.float64))

    def read(self):
        loss, hits = (self.sums / max(self.count, 1)).tolist()
        means = dict(loss=loss, accuracy=hits)
        if self.class_sums is not None: # The mean of the accuracies on generated and on real images.
            means['balanced_accuracy'] = float((self.class_sums[0] / self.class_sums[1].clamp(min=1)).mean())
        return means

    def show(self, bar, batch_idx, last):
        if not bar.disable and ((batch_idx + 1) % self.log_every == 0 or last):
            means = self.read()
            extra = {'balanced_acc': f'{means["balanced_accuracy"]:.3f}'} if 'balanced_accuracy' in means else {}
            bar.set_postfix(loss=f'{means["loss"]:.4f}', acc=f'{means["accuracy"]:.3f}', **extra)

def shuffled_batches(num, batch_size, generator):
    """Index batches of a seeded permutation; the last, short batch is dropped (as DG's loader)."""
    perm = torch.randperm(num, generator=generator)
    return [perm[i:i + batch_size] for i in range(0, num - batch_size + 1, batch_size)]

#----------------------------------------------------------------------------

def train_discriminator(classifier, real_images, fake_images, outdir, real_labels=None, fake_labels=None, cond=False,
    num_classes=1000, epochs=50, batch_size=128, lr=3e-4, weight_decay=1e-7, model_channels=128, num_res_blocks=2,
    seed=0, device=torch.device('cpu'), progress=True):
    """Train a discriminator head on `classifier`'s features; writes outdir/discriminator_{epoch}.pt.

    real/fake_images: uint8 [N, C, H, W]; *_labels: int64 [N] (needed when cond). Returns the
    network and a list of per-epoch dicts with the mean loss, accuracy and balanced accuracy (the
    mean of the accuracies on real and on generated images).

    The two classes are weighted inversely to their counts, so that each holds half of the loss:
    otherwise, on 1797 real vs 400 generated images, calling everything real already scores 82%.
    With equal counts the weights are 1 and the loss is DG's.
    """
    classifier = classifier.to(device).eval().requires_grad_(False)
    disc = adm_encoder.EncoderUNet(**adm_encoder.discriminator_kwargs(classifier.feature_channels, classifier.feature_resolution,
        cond=cond, model_channels=model_channels, num_res_blocks=num_res_blocks, num_classes=num_classes)).to(device).train()
    optimizer = torch.optim.Adam(disc.parameters(), lr=lr, weight_decay=weight_decay)
    images = torch.cat([real_images, fake_images])
    targets = torch.cat([torch.ones(len(real_images)), torch.zeros(len(fake_images))])
    total = len(real_images) + len(fake_images)
    class_weights = torch.cat([torch.full([len(real_images)], total / (2 * len(real_images))), torch.full([len(fake_images)], total / (2 * len(fake_images)))])
    labels = torch.cat([real_labels, fake_labels]) if cond else None
    order_gen = torch.Generator().manual_seed(seed) # Batch order: indices into the images, which stay in host memory.
    noise_gen = torch.Generator(device).manual_seed(seed) # Times and noise, drawn where the images are trained on.
    resolution = images.shape[-1]
    batches = shuffled_batches(len(images), batch_size, order_gen)
    if len(batches) == 0:
        raise ValueError(f'--batch={batch_size} is more than the {len(images)} real and generated images together')
    set_backend_flags()

    history = []
    os.makedirs(outdir, exist_ok=True)
    for epoch in range(1, epochs + 1):
        means = EpochMeans(device)
        bar = tqdm.tqdm(batches, desc=f'epoch {epoch}/{epochs}', unit='batch', disable=not progress)
        for batch_idx, idx in enumerate(bar):
            x0 = misc.uint8_to_model_range(images[idx]).to(device)
            t = dg.sample_importance_time(len(idx), generator=noise_gen, device=device)
            x_t = dg.diffuse(x0, t, generator=noise_gen)
            t_in = dg.classifier_time(t, resolution)
            with torch.no_grad():
                features = classifier.features(x_t, t_in)
            logits = disc(features, t_in, labels[idx].to(device) if cond else None).reshape(-1)
            y = targets[idx].to(device)
            # BCE of sigmoid(logits), as DG's BCELoss on the sigmoid, without its log(0) clamp.
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=class_weights[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct = ((logits > 0).float() == y).float()
            means.add(loss, correct.sum(), len(idx))
            means.add_classes(correct, y)
            means.show(bar, batch_idx, last=(batch_idx == len(batches) - 1))
        history.append(dict(epoch=epoch, **means.read()))
        save_state_dict(os.path.join(outdir, f'discriminator_{epoch}.pt'), disc)
        batches = shuffled_batches(len(images), batch_size, order_gen)
    return disc.eval(), history

#----------------------------------------------------------------------------

def rotate_for_self_supervision(x, generator):
    """Each (square) image rotated by k * 90 degrees, k uniform in 0..3; returns (images, k).

    All four rotations are made and each image picks its own, which reads no k back to the host.
    """
    k = torch.randint(4, [x.shape[0]], generator=generator, device=x.device)
    rotations = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    return rotations[k, torch.arange(x.shape[0], device=x.device)], k

def train_classifier(images, outdir, labels=None, epochs=10, batch_size=128, lr=3e-4, weight_decay=0.05,
    model_channels=128, num_res_blocks=None, t_min=1e-5, seed=0, device=torch.device('cpu'), progress=True):
    """Train the noise-conditional ADM classifier; writes outdir/classifier_{epoch}.pt.

    images: uint8 [N, C, H, W]; labels: int64 [N], or None for the rotation task (4 outputs).
    Returns the network and a list of per-epoch dicts with the mean loss and accuracy.
    """
    resolution = images.shape[-1]
    num_outputs = int(labels.max()) + 1 if labels is not None else 4
    net = adm_encoder.EncoderUNet(**adm_encoder.classifier_kwargs(resolution, model_channels=model_channels,
        num_res_blocks=num_res_blocks, num_outputs=num_outputs, in_channels=images.shape[1])).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay) # ADM's classifier optimizer.
    order_gen = torch.Generator().manual_seed(seed) # Batch order: indices into the images, which stay in host memory.
    noise_gen = torch.Generator(device).manual_seed(seed) # Rotations, times and noise, drawn where the images are trained on.
    if len(shuffled_batches(len(images), batch_size, order_gen)) == 0:
        raise ValueError(f'--batch={batch_size} is more than the {len(images)} images')
    set_backend_flags()

    history = []
    os.makedirs(outdir, exist_ok=True)
    for epoch in range(1, epochs + 1):
        means = EpochMeans(device)
        batches = shuffled_batches(len(images), batch_size, order_gen)
        bar = tqdm.tqdm(batches, desc=f'epoch {epoch}/{epochs}', unit='batch', disable=not progress)
        for batch_idx, idx in enumerate(bar):
            x0 = misc.uint8_to_model_range(images[idx]).to(device)
            y = labels[idx].to(device) if labels is not None else None
            if y is None:
                x0, y = rotate_for_self_supervision(x0, noise_gen)
            t = torch.rand(len(idx), generator=noise_gen, device=device) * (1 - t_min) + t_min
            x_t = dg.diffuse(x0, t, generator=noise_gen)
            logits = net(x_t, dg.classifier_time(t, resolution))
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            means.add(loss, (logits.argmax(dim=1) == y).sum(), len(idx))
            means.show(bar, batch_idx, last=(batch_idx == len(batches) - 1))
        history.append(dict(epoch=epoch, **means.read()))
        save_state_dict(os.path.join(outdir, f'classifier_{epoch}.pt'), net)
    return net.eval(), history

#----------------------------------------------------------------------------

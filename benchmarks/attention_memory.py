"""Activation memory of attention in training: what autograd keeps for the backward pass.

Counts the bytes of the distinct storages that autograd saves during one forward pass of a U-Net
(a storage saved by several ops, or viewed by several saved tensors, counts once: that is the
memory held), per sample, on the meta device (nothing is allocated, so full-size networks are
quick), with attention weights computed by training.networks.AttentionWeights (saves q, k
and W in the activation dtype, as NVIDIA EDM's AttentionOp does) and by plain differentiable
ops (which also keep float32 copies of q and k and the float32 softmax).

    python benchmarks/attention_memory.py                      # ADM at 64x64, EDM's ImageNet config
    python benchmarks/attention_memory.py --arch=ddpmpp --resolution=32
"""

import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import networks

#----------------------------------------------------------------------------

def plain_autograd_attention(q, k):
    """The same weights through ordinary ops; autograd then saves what each op needs."""
    logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)

ARCHS = {
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8]),
    'ddpmpp': dict(model_type='SongUNet', model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16]),
}

def saved_storage_bytes(fn, *args, **kwargs):
    """Bytes of the distinct storages that autograd saves while running fn(*args, **kwargs)."""
    storages = {}
    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes() # _cdata identifies the storage, also on the meta device.
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args, **kwargs)
    return sum(storages.values())

def measure(arch, resolution, dtype, attention, batch, label_dim=1000):
    with torch.device('meta'):
        model = getattr(networks, ARCHS[arch]['model_type'])(img_resolution=resolution, in_channels=3, out_channels=3,
            label_dim=label_dim, **{k: v for k, v in ARCHS[arch].items() if k != 'model_type'})
        x = torch.zeros([batch, 3, resolution, resolution], dtype=dtype)
        noise_labels = torch.zeros([batch])
        class_labels = torch.zeros([batch, label_dim])
    original = networks.attention_weights
    networks.attention_weights = attention
    try:
        return saved_storage_bytes(model.train(), x, noise_labels, class_labels=class_labels)
    finally:
        networks.attention_weights = original

#----------------------------------------------------------------------------

@click.command()
@click.option('--arch',       help='Network', type=click.Choice(sorted(ARCHS)), default='adm', show_default=True)
@click.option('--resolution', help='Image size', metavar='INT', type=click.IntRange(min=8), default=64, show_default=True)
def main(arch, resolution):
    """Print the MiB autograd saves per sample, ours against plain autograd, in fp16 and fp32.

    Per sample is the growth from batch 1 to batch 2: what is saved once per batch (the parameters,
    and their float16 copies in fp16) is printed apart.
    """
    mib = 2 ** 20
    print(f'{arch}-{resolution}: saved for backward, MiB per sample (and per batch, whatever its size)')
    print(f'{"dtype":8s} {"AttentionWeights":>17s} {"plain autograd":>17s} {"ratio":>6s}')
    for dtype in [torch.float16, torch.float32]:
        row = []
        for attention in [networks.AttentionWeights.apply, plain_autograd_attention]:
            one, two = (measure(arch, resolution, dtype, attention, batch=batch) for batch in [1, 2])
            row.append((two - one, 2 * one - two))
        (ours, ours_fixed), (plain, plain_fixed) = row
        name = str(dtype).replace('torch.', '')
        print(f'{name:8s} {ours / mib:8.1f} ({ours_fixed / mib:6.1f}) {plain / mib:8.1f} ({plain_fixed / mib:6.1f}) {plain / ours:6.3f}')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Shared fixtures: tiny networks and snapshots that the tests build themselves."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import dnnlib
from training import checkpoint
from training import networks

#----------------------------------------------------------------------------

TINY_SONG = dict(model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
TINY_ADM = dict(model_type='DhariwalUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)

def make_tiny_net(precond='EDMPrecond', label_dim=0, resolution=8, channels=3, seed=0, networks_module=networks, **kwargs):
    """A small preconditioned network in eval mode whose every weight is non-trivial.

    EDM initializes the last layer of each block to (nearly) zero, which would make an untrained
    network's output almost independent of its weights; a random perturbation avoids tests that
    pass by accident.
    """
    model_kwargs = dict(TINY_SONG)
    model_kwargs.update(kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = getattr(networks_module, precond)(img_resolution=resolution, img_channels=channels, label_dim=label_dim, **model_kwargs)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return net.eval().requires_grad_(False)

def save_tiny_snapshot(path, net):
    checkpoint.save_snapshot(path, dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(path='unused.zip')))
    return str(path)

def run_cli(args, cwd=REPO, env=None, timeout=300):
    """Run a command in a fresh process; returns CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.setdefault('OMP_NUM_THREADS', '1')
    if env:
        full_env.update(env)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)

#----------------------------------------------------------------------------
# The networks module as NVIDIA's release has it, in the one respect that matters
# to the tests: attention weights through an old-style autograd.Function (forward
# taking ctx, no vmap rule), which torch.func refuses. Appended to our source, the
# new definition rebinds the module-level name that UNetBlock calls.
OLD_STYLE_ATTENTION = '''

class _OldStyleAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k):
        return _attention_logits(q, k).softmax(dim=2).to(q.dtype)

def attention_weights(q, k):
    return _OldStyleAttention.apply(q, k)
'''

def legacy_networks_source():
    with open(os.path.join(REPO, 'training', 'networks.py')) as f:
        return f.read() + OLD_STYLE_ATTENTION

def legacy_networks_module():
    """training/networks.py with legacy attention, executed as a separate module like a pickle's."""
    from torch_utils import persistence
    return persistence._src_to_module(legacy_networks_source())

#----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_download_attempt(monkeypatch):
    """The tests have no internet access: a download fails at its first attempt, without open_url's
    pauses between retries (1 s + 2 s, for flaky networks, not absent ones). In-process only; a test
    that passes num_attempts keeps it."""
    open_url = dnnlib.util.open_url
    def open_url_once(url, *args, num_attempts=1, **kwargs):
        return open_url(url, *args, num_attempts=num_attempts, **kwargs)
    monkeypatch.setattr(dnnlib.util, 'open_url', open_url_once)

#----------------------------------------------------------------------------

@pytest.fixture(scope='session')
def cond_net_pkl(tmp_path_factory):
    """A class-conditional (4 classes) EDM-preconditioned DDPM++-style network pickle, 8x8 RGB."""
    return save_tiny_snapshot(tmp_path_factory.mktemp('nets') / 'cond.pkl', make_tiny_net(label_dim=4))

@pytest.fixture(scope='session')
def uncond_net_pkl(tmp_path_factory):
    """An unconditional VP-preconditioned network pickle, 8x8 RGB."""
    return save_tiny_snapshot(tmp_path_factory.mktemp('nets') / 'uncond.pkl', make_tiny_net(precond='VPPrecond'))

#----------------------------------------------------------------------------

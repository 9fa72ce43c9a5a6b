"""Our network classes have the published checkpoints' layout and rebuild pickled networks exactly."""

import json
import os

import pytest
import torch

from conftest import REPO, legacy_networks_module, make_tiny_net, save_tiny_snapshot
from training import checkpoint
from training import networks

# Names and shapes of every state_dict entry of NVIDIA's published EDM networks, in order
# (CIFAR-10 DDPM++ cond / NCSN++ uncond, FFHQ DDPM++, ImageNet ADM), with their parameter counts.
with open(os.path.join(REPO, 'tests', 'data', 'edm_published_layouts.json')) as f:
    PUBLISHED_LAYOUTS = json.load(f)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(PUBLISHED_LAYOUTS))
def test_state_dict_layout_matches_published_checkpoint(name):
    layout = PUBLISHED_LAYOUTS[name]
    with torch.device('meta'): # Full-size networks without allocating their weights.
        net = getattr(networks, layout['precond'])(**layout['kwargs'])
    ours = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert ours == list(layout['state_dict'].items()) # Same names, same shapes, same order.
    assert sum(p.numel() for p in net.parameters()) == layout['num_params']

#----------------------------------------------------------------------------

ARCHITECTURES = {
    'ddpmpp': dict(),
    'ncsnpp': dict(embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    'song_skip': dict(encoder_type='skip', decoder_type='skip'),
    'adm': dict(model_type='DhariwalUNet', model_channels=16),
}

@pytest.mark.parametrize('precond', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'])
@pytest.mark.parametrize('arch', sorted(ARCHITECTURES))
def test_rebuilt_network_gives_the_pickled_code_bitwise_equal_outputs(tmp_path, precond, arch):
    net = make_tiny_net(precond=precond, label_dim=5, augment_dim=9, networks_module=legacy_networks_module(), **ARCHITECTURES[arch])
    pkl = save_tiny_snapshot(tmp_path / 'net.pkl', net)
    pickled = checkpoint.load_network(pkl, native=False)
    native = checkpoint.load_network(pkl)
    assert type(pickled).__module__ != 'training.networks' and type(native) is getattr(networks, precond)
    x = torch.randn(4, 3, 8, 8) * 5
    sigma = torch.tensor([0.002, 0.3, 4.0, 80.0])
    labels = torch.eye(5)[[0, 2, 4, 1]]
    augment = torch.randn(4, 9)
    expected = pickled(x, sigma, labels, augment_labels=augment)
    assert torch.equal(native(x, sigma, labels, augment_labels=augment), expected)
    assert torch.equal(net(x, sigma, labels, augment_labels=augment), expected)

def test_rebuilt_network_keeps_eval_mode_and_frozen_parameters(tmp_path):
    pkl = save_tiny_snapshot(tmp_path / 'net.pkl', make_tiny_net(dropout=0.5))
    native = checkpoint.load_network(pkl)
    assert not native.training and not any(m.training for m in native.modules())
    assert not any(p.requires_grad for p in native.parameters())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(native(x, torch.tensor(1.0)), native(x, torch.tensor(1.0))) # Dropout is off.

#----------------------------------------------------------------------------

def test_vp_sigma_inverse_round_trips():
    net = make_tiny_net(precond='VPPrecond')
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    assert torch.allclose(net.sigma_inv(net.sigma(t)), t, rtol=1e-9, atol=1e-12)
    assert net.sigma_min == pytest.approx(float(net.sigma(1e-5))) and net.sigma_max == pytest.approx(float(net.sigma(1)))

def test_iddpm_round_sigma_snaps_to_its_discrete_levels():
    net = make_tiny_net(precond='iDDPMPrecond')
    sigma = torch.tensor([0.001, 0.5, 3.0, 200.0], dtype=torch.float64)
    rounded = net.round_sigma(sigma)
    index = net.round_sigma(sigma, return_index=True)
    assert rounded.dtype == torch.float64 and rounded.shape == sigma.shape
    assert torch.equal(rounded, net.u[index].to(torch.float64))
    assert torch.all((net.u[None, :] - sigma.to(torch.float32)[:, None]).abs().min(dim=1).values == (rounded - sigma).abs().to(torch.float32))
    assert net.sigma_max == pytest.approx(float(net.u[0])) and net.sigma_max > 80

def test_edm_precond_is_the_identity_at_zero_noise_and_attenuates_at_high_noise():
    net = make_tiny_net(precond='EDMPrecond')
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(net(x, torch.tensor(1e-8)), x, atol=1e-6) # c_skip -> 1, c_out -> 0.
    big = net(x * 1000, torch.tensor(1000.0)) # c_skip ~ 0: output is the network's guess, not the input.
    assert big.abs().max() < 100

def test_unconditional_and_conditional_inputs_are_checked_by_shape():
    net = make_tiny_net(label_dim=3)
    x = torch.randn(2, 3, 8, 8)
    a = net(x, torch.tensor(1.0), torch.eye(3)[[0, 1]])
    b = net(x, torch.tensor(1.0), torch.eye(3)[[1, 1]])
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) # Labels matter, per sample.

#----------------------------------------------------------------------------

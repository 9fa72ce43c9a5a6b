"""Network pickles travel both ways between this codebase and code that only shares the format.

The "other codebase" is tests/foreign_edm: an independent minimal implementation of the pickle
protocol of NVIDIA EDM, run in a subprocess that cannot import anything of ours.
"""

import os
import pickle
import sys
import textwrap
import warnings

import pytest
import torch

from conftest import REPO, legacy_networks_source, make_tiny_net, run_cli, save_tiny_snapshot
from torch_utils import persistence
from training import checkpoint
from training import networks

FOREIGN = os.path.join(REPO, 'tests', 'foreign_edm')

FOREIGN_WRITER = '''
import importlib.util, pickle, sys, torch
import dnnlib
spec = importlib.util.spec_from_file_location('training_networks_foreign', sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
torch.manual_seed(0)
configs = {
    'edm_ddpmpp_cond': ('EDMPrecond', dict(label_dim=3, model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9)),
    'vp_ncsnpp': ('VPPrecond', dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    've_skip': ('VEPrecond', dict(model_type='SongUNet', encoder_type='skip', decoder_type='skip', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    'iddpm_adm_cond': ('iDDPMPrecond', dict(label_dim=3, model_type='DhariwalUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
}
x = torch.randn(3, 3, 8, 8) * 3
sigma = torch.tensor([0.02, 1.0, 30.0])
labels = torch.eye(3)
results = {}
for name, (cls, kwargs) in configs.items():
    net = getattr(module, cls)(img_resolution=8, img_channels=3, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    net.eval().requires_grad_(False)
    with open(f'{sys.argv[2]}/{name}.pkl', 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dnnlib.util.EasyDict(path='x.zip')), f)
    results[name] = net(x, sigma, labels if net.label_dim else None)
torch.save(dict(x=x, sigma=sigma, labels=labels, outputs=results), f'{sys.argv[2]}/outputs.pt')
'''

FOREIGN_READER = '''
import pickle, sys, torch
with open(sys.argv[1], 'rb') as f:
    data = pickle.load(f)
net = data['ema']
assert type(net).__module__.startswith('_foreign_'), type(net).__module__
inputs = torch.load(sys.argv[2])
torch.save(net(inputs['x'], inputs['sigma'], inputs['labels']), sys.argv[3])
print(sorted(data.keys()), type(net).__name__, net.init_kwargs['label_dim'])
'''

def run_foreign(tmp_path, script, *args):
    script_path = tmp_path / 'foreign_script.py'
    script_path.write_text(script)
    result = run_cli([sys.executable, str(script_path), *map(str, args)], cwd=str(tmp_path), env=dict(PYTHONPATH=FOREIGN))
    assert result.returncode == 0, result.stderr
    return result.stdout

#----------------------------------------------------------------------------

@pytest.mark.slow
def test_pickle_from_another_codebase_rebuilds_on_our_classes_with_equal_outputs(tmp_path):
    src_path = tmp_path / 'legacy_networks.py'
    src_path.write_text(legacy_networks_source())
    run_foreign(tmp_path, FOREIGN_WRITER, src_path, tmp_path)
    ref = torch.load(tmp_path / 'outputs.pt')
    for name, expected in ref['outputs'].items():
        with open(tmp_path / f'{name}.pkl', 'rb') as f:
            pickled = pickle.load(f)['ema'] # Plain pickle.load must work inside this codebase.
        assert type(pickled).__module__.startswith('_imported_module_')
        with warnings.catch_warnings():
            warnings.simplefilter('error') # Every class is known: no fallback warning allowed.
            native = checkpoint.load_network(str(tmp_path / f'{name}.pkl'))
        assert type(native) is getattr(networks, type(pickled).__name__)
        assert not native.training
        labels = ref['labels'] if native.label_dim else None
        assert torch.equal(native(ref['x'], ref['sigma'], labels), expected), name
        assert native.state_dict().keys() == pickled.state_dict().keys()

@pytest.mark.slow
def test_our_pickle_loads_in_another_codebase_with_equal_outputs(tmp_path):
    net = make_tiny_net(label_dim=3, augment_dim=9)
    pkl = save_tiny_snapshot(tmp_path / 'ours.pkl', net)
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.eye(3)
    torch.save(dict(x=x, sigma=sigma, labels=labels), tmp_path / 'inputs.pt')
    out = run_foreign(tmp_path, FOREIGN_READER, pkl, tmp_path / 'inputs.pt', tmp_path / 'outputs.pt')
    assert "['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn'] EDMPrecond 3" in out
    assert torch.equal(torch.load(tmp_path / 'outputs.pt'), net(x, sigma, labels))

@pytest.mark.slow
def test_loaded_network_works_under_torch_func_only_after_native_rebuild(tmp_path):
    src_path = tmp_path / 'legacy_networks.py'
    src_path.write_text(legacy_networks_source())
    run_foreign(tmp_path, FOREIGN_WRITER, src_path, tmp_path)
    pkl = str(tmp_path / 'edm_ddpmpp_cond.pkl')
    pickled = checkpoint.load_network(pkl, native=False)
    native = checkpoint.load_network(pkl)
    x, sigma = torch.randn(1, 3, 8, 8), torch.tensor([1.0])
    f = lambda net: (lambda x: net(x, sigma).sum())
    with pytest.raises(RuntimeError):
        torch.func.grad(f(pickled))(x) # The custom autograd.Function has no functorch support.
    assert torch.func.grad(f(native))(x).shape == x.shape

#----------------------------------------------------------------------------

UNKNOWN_CLASS_SOURCE = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class HalvingDenoiser(torch.nn.Module):
        def __init__(self, img_resolution, img_channels):
            super().__init__()
            self.img_resolution = img_resolution
            self.img_channels = img_channels
            self.label_dim = 0
            self.sigma_min, self.sigma_max = 0, float('inf')
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, sigma, class_labels=None):
            return x.to(torch.float32) * self.scale

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)
''')

def test_unknown_network_class_falls_back_to_pickled_code_with_a_warning(tmp_path):
    module = persistence._src_to_module(UNKNOWN_CLASS_SOURCE)
    net = module.HalvingDenoiser(img_resolution=8, img_channels=3)
    pkl = save_tiny_snapshot(tmp_path / 'unknown.pkl', net)
    with pytest.warns(UserWarning, match='HalvingDenoiser'):
        loaded = checkpoint.load_network(pkl)
    assert type(loaded).__name__ == 'HalvingDenoiser'
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x, torch.tensor(1.0)), x * 0.5)

def test_reloaded_network_can_be_pickled_again_with_its_embedded_source(tmp_path):
    module = persistence._src_to_module(UNKNOWN_CLASS_SOURCE)
    pkl = save_tiny_snapshot(tmp_path / 'first.pkl', module.HalvingDenoiser(img_resolution=8, img_channels=3))
    loaded = checkpoint.load_network(pkl, native=False)
    second = save_tiny_snapshot(tmp_path / 'second.pkl', loaded)
    with open(second, 'rb') as f:
        data = pickle.load(f)
    assert type(data['ema']).__name__ == 'HalvingDenoiser'
    assert data['ema'].init_kwargs == dict(img_resolution=8, img_channels=3)

def test_import_hook_can_patch_pickled_source(tmp_path):
    module = persistence._src_to_module(UNKNOWN_CLASS_SOURCE)
    pkl = save_tiny_snapshot(tmp_path / 'hooked.pkl', module.HalvingDenoiser(img_resolution=8, img_channels=3))
    def triple_instead(meta):
        if meta.class_name == 'HalvingDenoiser':
            meta.module_src = meta.module_src.replace('return x.to(torch.float32) * self.scale', 'return x.to(torch.float32) * 3')
        return meta
    persistence.import_hook(triple_instead)
    try:
        loaded = checkpoint.load_network(pkl, native=False)
    finally:
        persistence._import_hooks.remove(triple_instead)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(loaded(x, torch.tensor(1.0)), x * 3)

def test_constructor_arguments_are_recorded_and_must_be_picklable():
    net = make_tiny_net(precond='VEPrecond', sigma_max=50)
    assert net.init_kwargs.sigma_max == 50 and net.init_kwargs.model_type == 'SongUNet'
    with pytest.raises((pickle.PicklingError, AttributeError)):
        networks.GroupNorm(num_channels=8, eps=lambda: 1e-5) # A lambda cannot be pickled.

#----------------------------------------------------------------------------

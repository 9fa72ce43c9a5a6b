"""Weights-only network files: the same network as its pickle, loaded without running code from the file."""

import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import make_tiny_net, run_cli, save_tiny_snapshot
from training import bundled
from training import checkpoint

#----------------------------------------------------------------------------

def outputs(net, seed=0):
    """The denoiser on fixed inputs across the noise range, with labels when it takes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([3, net.img_channels, net.img_resolution, net.img_resolution], generator=g) * 3
    labels = torch.eye(net.label_dim)[torch.arange(3) % net.label_dim] if net.label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.02, 1.0, 30.0]), labels)

def assert_same_network(a, b):
    assert type(a) is type(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert torch.equal(outputs(a), outputs(b))

SMALL_NETS = { # DDPM++, NCSN++ (VP and VE flavours) and ADM, as in EDM's configurations, tiny.
    'ddpmpp_edm_cond': dict(precond='EDMPrecond', label_dim=3, augment_dim=9),
    'ncsnpp_vp': dict(precond='VPPrecond', embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    'ncsnpp_ve_skip': dict(precond='VEPrecond', encoder_type='skip', decoder_type='skip'),
    'adm_iddpm_cond': dict(precond='iDDPMPrecond', label_dim=3, model_type='DhariwalUNet', model_channels=16),
    'adm_edm': dict(precond='EDMPrecond', model_type='DhariwalUNet', model_channels=16),
}

@pytest.mark.parametrize('name', SMALL_NETS)
def test_small_networks_round_trip_bit_identically(tmp_path, name):
    net = make_tiny_net(**SMALL_NETS[name])
    checkpoint.save_weights_only(tmp_path / 'net.pt', net)
    loaded = checkpoint.load_network(str(tmp_path / 'net.pt'))
    assert_same_network(loaded, net)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

@pytest.mark.slow
def test_the_bundled_network_converts_to_the_same_function_with_its_dataset_kwargs(tmp_path):
    checkpoint.convert_to_weights_only(bundled.NETWORK, str(tmp_path / 'net.pt'))
    net, metadata = checkpoint.load_weights_only(str(tmp_path / 'net.pt'), return_metadata=True)
    assert_same_network(net, checkpoint.load_network(bundled.NETWORK))
    assert metadata['dataset_kwargs']['path'] == 'bundled/digits-16x16.zip'

def test_a_converted_snapshot_is_the_same_network_as_the_pickle(tmp_path):
    net = make_tiny_net(**SMALL_NETS['adm_iddpm_cond'])
    pkl = save_tiny_snapshot(tmp_path / 'snap.pkl', net)
    checkpoint.convert_to_weights_only(pkl, str(tmp_path / 'net.pt'))
    assert_same_network(checkpoint.load_network(str(tmp_path / 'net.pt')), checkpoint.load_network(pkl))

def test_the_file_holds_only_plain_data(tmp_path):
    """What makes it safe: torch.load(weights_only=True) reads it with no globals allowed beyond torch's own."""
    checkpoint.save_weights_only(tmp_path / 'net.pt', make_tiny_net(label_dim=2), metadata=dict(note='x'))
    data = torch.load(tmp_path / 'net.pt', weights_only=True)
    assert data['format'] == checkpoint.WEIGHTS_ONLY_FORMAT and data['class_name'] == 'EDMPrecond'
    assert type(data['init_kwargs']) is dict and data['init_kwargs']['label_dim'] == 2 and data['metadata'] == dict(note='x')

#----------------------------------------------------------------------------
# Crafted files are refused in one line and run nothing.

class MakeMarker:
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (open, (self.path, 'w'))

def crafted_files(tmp_path):
    """{what: (path, fragment of the refusal)}; the marker file must never appear."""
    marker = tmp_path / 'marker'
    good = tmp_path / 'good.pt'
    checkpoint.save_weights_only(good, make_tiny_net())
    files = {}
    def variant(name, fragment, **changes):
        data = torch.load(good, weights_only=True)
        data.update(changes)
        torch.save(data, tmp_path / f'{name}.pt')
        files[name] = (tmp_path / f'{name}.pt', fragment)
    variant('reduce_payload', 'holds objects other than tensors and plain values', metadata=dict(x=MakeMarker(str(marker))))
    variant('unknown_class', "names class 'Exploit'", class_name='Exploit')
    variant('module_name_as_class', "names class 'persistence'", class_name='persistence')
    kwargs = torch.load(good, weights_only=True)['init_kwargs']
    variant('unknown_model_type', "names model_type 'torch'", init_kwargs={**kwargs, 'model_type': 'torch'})
    variant('huge_arguments', 'state_dict does not match the constructor arguments', init_kwargs={**kwargs, 'model_channels': 1 << 20})
    variant('no_format', 'not a weights-only network of this codebase', format='something else')
    variant('wrong_version', 'of version 99', version=99)
    return marker, files

@pytest.mark.parametrize('name', ['ncsnpp_vp', 'adm_iddpm_cond'])
def test_huge_arguments_are_refused_where_only_the_inner_model_is_built_on_meta(tmp_path, name):
    checkpoint.save_weights_only(tmp_path / 'good.pt', make_tiny_net(**SMALL_NETS[name]))
    data = torch.load(tmp_path / 'good.pt', weights_only=True)
    data['init_kwargs'] = {**data['init_kwargs'], 'model_channels': 1 << 20}
    torch.save(data, tmp_path / 'huge.pt')
    with pytest.raises(checkpoint.CheckpointError, match='they build a much larger network'):
        checkpoint.load_network(str(tmp_path / 'huge.pt'))

def test_crafted_files_are_refused_by_the_loader(tmp_path):
    marker, files = crafted_files(tmp_path)
    for name, (path, fragment) in files.items():
        with pytest.raises(checkpoint.CheckpointError, match=fragment.replace('(', r'\(')):
            checkpoint.load_network(str(path))
    assert not marker.exists()

@pytest.mark.slow
@pytest.mark.parametrize('name', ['reduce_payload', 'unknown_class'])
def test_generate_refuses_a_crafted_file_in_one_line(tmp_path, name):
    marker, files = crafted_files(tmp_path)
    path, fragment = files[name]
    result = run_cli([sys.executable, 'generate.py', '--device=cpu', f'--network={path}', f'--outdir={tmp_path / "out"}', '--seeds=0'])
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('Error: ') and fragment in lines[0], result.stderr
    assert not marker.exists() and not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------
# The command line: convert, then generate the same images without the pickle warning.

def read_pngs(folder):
    return {name: np.asarray(PIL.Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder)) if name.endswith('.png')}

@pytest.mark.slow
def test_generate_from_the_converted_bundled_network_gives_the_same_images_and_no_warning(tmp_path):
    # A copy outside bundled/, so that the pickle's exemption from the warning does not hide anything.
    pkl = tmp_path / 'copy.pkl'
    pkl.write_bytes(open(bundled.NETWORK, 'rb').read())
    result = run_cli([sys.executable, '-m', 'training.checkpoint', '--weights-only', f'--src={pkl}', f'--dest={tmp_path / "net.pt"}'])
    assert result.returncode == 0, result.stderr
    runs = {}
    for name in ['copy.pkl', 'net.pt']:
        result = run_cli([sys.executable, 'generate.py', '--device=cpu', f'--network={tmp_path / name}', f'--outdir={tmp_path / name}-images', '--seeds=0-7', '--no-grid'])
        assert result.returncode == 0, result.stderr
        runs[name] = (read_pngs(tmp_path / f'{name}-images'), result.stderr)
    assert 'runs the Python code' in runs['copy.pkl'][1]
    assert 'runs the Python code' not in runs['net.pt'][1] and 'Warning' not in runs['net.pt'][1]
    pkl_images, pt_images = runs['copy.pkl'][0], runs['net.pt'][0]
    assert len(pkl_images) == 8 and pkl_images.keys() == pt_images.keys()
    assert all(np.array_equal(pkl_images[name], pt_images[name]) for name in pkl_images)

def test_converter_refuses_a_weights_only_file_as_re_export_source(tmp_path):
    checkpoint.save_weights_only(tmp_path / 'net.pt', make_tiny_net())
    with pytest.raises(checkpoint.CheckpointError, match='re-export reads a snapshot pickle'):
        checkpoint.reexport_snapshot(str(tmp_path / 'net.pt'), str(tmp_path / 'out.pkl'))
    assert not (tmp_path / 'out.pkl').exists()

def test_only_our_classes_can_be_written():
    with pytest.raises(checkpoint.CheckpointError, match='only VPPrecond'):
        checkpoint.save_weights_only('/nonexistent/never-written.pt', torch.nn.Linear(2, 2))

#----------------------------------------------------------------------------

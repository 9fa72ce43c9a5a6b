"""The bundled default: network, detector and reference statistics work offline, out of the box."""

import os
import sys

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.tiny_models import write_image_folder
from training.dataset import ImageFolderDataset

BUNDLED = os.path.join(REPO, 'bundled')

#----------------------------------------------------------------------------

def fid_of(folder):
    result = run_cli([sys.executable, 'fid.py', 'calc', f'--images={folder}', f'--ref={os.path.join(BUNDLED, "digits-16x16-ref.npz")}', '--num=8', '--device=cpu'])
    assert result.returncode == 0, result.stderr
    assert 'digits-detector.pt' in result.stdout # fid.py says it used the detector the reference records.
    return float(result.stdout.strip().splitlines()[-1]) # fid.py prints the FID last, alone on its line.

@pytest.mark.slow
def test_bundled_network_generates_digits_that_the_bundled_detector_scores(tmp_path):
    # No --network: generate.py takes the bundled model.
    result = run_cli([sys.executable, 'generate.py', f'--outdir={tmp_path / "digits"}', '--seeds=0-7', '--device=cpu', '--no-grid'])
    assert result.returncode == 0, result.stderr
    assert 'edm-digits-16x16.pkl' in result.stdout
    assert sorted(os.listdir(tmp_path / 'digits')) == [f'{seed:06d}.png' for seed in range(8)]

    # With 8 images FD is dominated by their small-sample covariance; still, the generated digits
    # score about like 8 real digits, and far better than 8 images of noise.
    dataset = ImageFolderDataset(os.path.join(BUNDLED, 'digits-16x16.zip'), max_size=8, random_seed=1)
    write_image_folder(tmp_path / 'real', np.stack([dataset[i][0].transpose(1, 2, 0) for i in range(8)]))
    noise = np.random.RandomState(0).randint(0, 256, size=[8, 16, 16, 1]).astype(np.uint8)
    write_image_folder(tmp_path / 'noise', noise)
    fd_generated, fd_real, fd_noise = (fid_of(tmp_path / name) for name in ['digits', 'real', 'noise'])
    assert np.isfinite(fd_generated) and 0 < fd_generated < 1.5 * fd_real
    assert fd_generated < fd_noise / 2

#----------------------------------------------------------------------------

def test_bundled_network_embeds_the_current_networks_source():
    # The pickle carries the text of training/networks.py (NVIDIA's code executes it); a change to
    # that file needs the pickle written again, which keeps its weights.
    from training import checkpoint
    net = checkpoint.load_network(os.path.join(BUNDLED, 'edm-digits-16x16.pkl'), native=False, verbose=False)
    with open(os.path.join(REPO, 'training', 'networks.py')) as f:
        current = f.read()
    assert type(net)._orig_module_src == current, ('bundled/edm-digits-16x16.pkl embeds an older training/networks.py; re-export it: '
        'python -m training.checkpoint --src=bundled/edm-digits-16x16.pkl --dest=bundled/edm-digits-16x16.pkl')

@pytest.mark.slow
def test_reexport_keeps_weights_and_outputs_and_embeds_current_source(tmp_path):
    from conftest import legacy_networks_module, make_tiny_net, save_tiny_snapshot
    from training import checkpoint
    old = make_tiny_net(label_dim=3, networks_module=legacy_networks_module()) # Another module's source.
    src = save_tiny_snapshot(tmp_path / 'old.pkl', old)
    result = run_cli([sys.executable, '-m', 'training.checkpoint', f'--src={src}', f'--dest={tmp_path / "new.pkl"}'])
    assert result.returncode == 0, result.stderr
    new = checkpoint.load_network(str(tmp_path / 'new.pkl'), native=False, verbose=False)
    with open(os.path.join(REPO, 'training', 'networks.py')) as f:
        assert type(new)._orig_module_src == f.read() != type(old)._orig_module_src
    import torch
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 8.0]), torch.eye(3)[:2]
    assert torch.equal(new(x, sigma, labels), old(x, sigma, labels))

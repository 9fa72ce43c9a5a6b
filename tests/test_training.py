"""train.py trains every preconditioning, resumes exactly, and writes snapshots generate.py loads."""

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import train
from conftest import run_cli
from training import checkpoint
from training import loss as loss_lib

#----------------------------------------------------------------------------

def write_dataset(folder, n=32, resolution=8, labels=True, seed=0):
    """Smooth random blobs (learnable in a few hundred images) with labels 0..3 in dataset.json."""
    rnd = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    u = np.linspace(-1, 1, resolution)
    entries = []
    for i in range(n):
        cx, cy = rnd.uniform(-0.5, 0.5, size=2)
        blob = np.exp(-((u[None, :] - cx) ** 2 + (u[:, None] - cy) ** 2) / 0.2)
        image = (np.stack([blob, blob[::-1], blob.T], axis=2) * 255).astype(np.uint8)
        PIL.Image.fromarray(image).save(folder / f'img{i:03d}.png')
        entries.append([f'img{i:03d}.png', i % 4])
    with open(folder / 'dataset.json', 'w') as f:
        json.dump(dict(labels=entries if labels else None), f)
    return str(folder)

TINY = ['--cbase=8', '--cres=1,2', '--batch=16', '--workers=0', '--device=cpu', '--seed=1', '--lr_rampup=0', '--augment=0.3']

def train_in_process(outdir, data, *args):
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={data}', *TINY, *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def run_dir(outdir):
    (name,) = os.listdir(outdir)
    return os.path.join(outdir, name)

def ticks(folder):
    with open(os.path.join(folder, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'blobs')

#----------------------------------------------------------------------------

def fixed_set_loss(net, loss_fn, data_path):
    """The loss on the same images, noise levels and noise for every network compared."""
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(data_path, use_labels=True)
    images = torch.as_tensor(np.stack([dataset[i][0] for i in range(len(dataset))])).to(torch.float32) / 127.5 - 1
    labels = torch.as_tensor(np.stack([dataset[i][1] for i in range(len(dataset))]))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return float(torch.stack([loss_fn(net=net, images=images, labels=labels).mean() for _ in range(8)]).mean())

@pytest.mark.slow
@pytest.mark.parametrize('precond', ['vp', 've', 'edm', 'cdm'])
def test_each_preconditioning_trains_with_finite_decreasing_loss(tmp_path, data, precond):
    extra = ['--martingale_lambda=1', '--martingale_steps=3'] if precond == 'cdm' else []
    train_in_process(tmp_path, data, f'--precond={precond}', '--cond=1', '--duration=0.0005', '--tick=0.2', '--snap=100', '--dump=100', '--lr=3e-3', *extra)
    folder = run_dir(tmp_path)
    stats = ticks(folder)
    assert all(np.isfinite(tick['Loss/loss']['mean']) for tick in stats)
    if precond == 'cdm': # Its two parts beside the total, which is their sum.
        for tick in stats:
            assert np.isclose(tick['Loss/denoising']['mean'] + tick['Loss/martingale']['mean'], tick['Loss/loss']['mean'], rtol=1e-4, atol=1e-6)
    else:
        assert all('Loss/martingale' not in tick for tick in stats)
    state = torch.load(os.path.join(folder, 'training-state-000000.pt'), weights_only=False)
    snapshot = checkpoint.load_snapshot(os.path.join(folder, 'network-snapshot-000000.pkl'))
    trained = checkpoint.load_network(os.path.join(folder, 'network-snapshot-000000.pkl'), native=True)
    trained.load_state_dict(state['net']) # The training weights rather than their EMA.
    initial = type(trained)(**trained.init_kwargs)
    loss_fn = loss_lib.EDMLoss() if precond in ('edm', 'cdm') else snapshot['loss_fn']
    assert fixed_set_loss(trained, loss_fn, data) < 0.8 * fixed_set_loss(initial, loss_fn, data)

#----------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_continues_with_the_same_losses_as_an_uninterrupted_run(tmp_path, data):
    # Ticks of 3 iterations of 16 images end at 16, 64, 112, 160, 208 images; the first run stops at
    # 112, a tick boundary of the uninterrupted run, so their ticks line up after the resume.
    common = ['--precond=cdm', '--martingale_lambda=1', '--martingale_steps=3', '--cond=1', '--tick=0.048', '--snap=100', '--dump=100']
    train_in_process(tmp_path / 'full', data, *common, '--duration=0.000208')
    train_in_process(tmp_path / 'first', data, *common, '--duration=0.000112')
    state = os.path.join(run_dir(tmp_path / 'first'), 'training-state-000000.pt')
    train_in_process(tmp_path / 'second', data, *common, '--duration=0.000208', f'--resume={state}')
    full = [tick['Loss/loss']['mean'] for tick in ticks(run_dir(tmp_path / 'full'))]
    second = [tick['Loss/loss']['mean'] for tick in ticks(run_dir(tmp_path / 'second'))]
    assert len(second) == 2
    assert second == full[-2:] # Bit for bit, tick by tick.
    a = torch.load(os.path.join(run_dir(tmp_path / 'full'), 'training-state-000000.pt'), weights_only=False)
    b = torch.load(os.path.join(run_dir(tmp_path / 'second'), 'training-state-000000.pt'), weights_only=False)
    assert a['cur_nimg'] == b['cur_nimg'] == 208
    assert all(torch.equal(a['ema'][k], b['ema'][k]) for k in a['ema'])
    assert all(torch.equal(a['net'][k], b['net'][k]) for k in a['net'])

@pytest.mark.slow
def test_two_torchrun_ranks_train_and_the_snapshot_generates_images(tmp_path, data):
    result = run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
        f'--outdir={tmp_path / "runs"}', f'--data={data}', *TINY, '--cond=1', '--duration=0.0003', '--tick=0.1', '--snap=1', '--dump=1'])
    assert result.returncode == 0, result.stderr
    folder = run_dir(tmp_path / 'runs')
    assert 'gpus2' in os.path.basename(folder)
    assert [tick['Loss/loss']['num'] for tick in ticks(folder)][1] == 112 * 3 * 8 * 8 # All 112 images of tick 1, from both ranks.
    # --tick=0.1 --snap=1: one snapshot per tick, under 1 kimg apart, each under its own name (EDM's would repeat 000000).
    snapshots = sorted(name for name in os.listdir(folder) if name.startswith('network-snapshot-'))
    assert len(snapshots) == len(ticks(folder)) and 'network-snapshot-000000.016.pkl' in snapshots
    snapshot = os.path.join(folder, snapshots[-1])
    result = run_cli([sys.executable, 'generate.py', f'--network={snapshot}', f'--outdir={tmp_path / "images"}', '--seeds=0-3', '--steps=4', '--device=cpu', '--no-grid'])
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / 'images')) == [f'{seed:06d}.png' for seed in range(4)]

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def unlabelled(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'unlabelled', labels=False)

BAD_INPUTS = {
    'missing data':         (lambda t, d, u: [f'--data={t}/nowhere.zip'], 'dataset not found'),
    'cond without labels':  (lambda t, d, u: [f'--data={u}', '--cond=1'], 'has no labels'),
    'batch vs batch-gpu':   (lambda t, d, u: [f'--data={d}', '--batch=16', '--batch-gpu=6'], 'must be divisible'),
    'not a state file':     (lambda t, d, u: [f'--data={d}', f'--resume={t}/state.pt'], 'training-state-*.pt'),
    'cbase zero':           (lambda t, d, u: [f'--data={d}', '--cbase=0'], 'Invalid value for'),
}

@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_no_run_folder(tmp_path, data, unlabelled, case):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, [f'--outdir={out}', *TINY, *make_args(tmp_path, data, unlabelled)])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()

@pytest.mark.slow
def test_resume_from_another_configuration_is_refused(tmp_path, data):
    train_in_process(tmp_path / 'a', data, '--cond=1', '--duration=0.0003', '--tick=0.1', '--dump=1')
    states = sorted(name for name in os.listdir(run_dir(tmp_path / 'a')) if name.startswith('training-state-'))
    assert len(states) == 3 # --tick=0.1 --dump=1: states 0.1 kimg apart, none overwriting another.
    state = os.path.join(run_dir(tmp_path / 'a'), states[-1])
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "b"}', f'--data={data}', *TINY, '--cond=1', '--cres=1,1', f'--resume={state}'])
    assert result.exit_code != 0 and 'written with another configuration' in result.output and 'channel_mult' in result.output
    assert not (tmp_path / 'b').exists()

#----------------------------------------------------------------------------

"""Low-rank Gaussian mixture data (training/molrg.py), its exact denoiser, trainMoLRG.py, and the EDM/CDM speed benchmark."""

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import jacobian
import trainMoLRG
from conftest import REPO, run_cli
from training import checkpoint
from training.evaluation import jacobian_rank
from training import molrg
from training.sampling import sampler as sampler_lib
from training.dataset import DatasetError

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """3 classes of dimension 5 in 4x4x3 images, 400 samples each, as a file."""
    path = str(tmp_path_factory.mktemp('molrg') / molrg.dataset_filename(4, 3, 5, 400))
    assert molrg.prepare_molrg(path, 4, 3, 5, 400, seed=7) == 'generated'
    return path

def flat(images):
    return images.reshape(images.shape[0], -1).to(torch.float64)

#----------------------------------------------------------------------------
# The data.

def test_each_class_spans_exactly_per_class_dim_dimensions(small):
    data = molrg.load_molrg(small)
    assert data.bases.shape == (3, 48, 5) and data.images.shape == (1200, 3, 4, 4)
    for k in range(3):
        x = flat(data.images[data.labels == k])
        singular_values = torch.linalg.svdvals(x)
        assert singular_values[4] > 0.3 * singular_values[0]  # Five real directions...
        assert singular_values[5] < 1e-6 * singular_values[0] # ...and nothing else (float32 storage).
        # The directions are the stored basis (in the images' pixel order): projecting changes nothing.
        u = data.bases[k]
        assert (x - x @ u @ u.T).abs().max() < 1e-5

def test_bases_are_orthonormal_and_the_classes_mutually_orthogonal(small):
    bases = molrg.load_molrg(small).bases
    all_columns = torch.cat(list(bases), dim=1)
    torch.testing.assert_close(all_columns.T @ all_columns, torch.eye(15, dtype=torch.float64), rtol=0, atol=1e-12)

def test_coefficients_are_standard_normal(small):
    data = molrg.load_molrg(small)
    for k in range(3):
        a = flat(data.images[data.labels == k]) @ data.bases[k] # [400, 5]
        assert a.mean(dim=0).abs().max() < 4 / math.sqrt(400)
        torch.testing.assert_close(a.T @ a / 400, torch.eye(5, dtype=torch.float64), rtol=0, atol=0.25)

def test_same_seed_gives_the_same_data_and_another_seed_other_data():
    a, b, c = (molrg.generate_molrg(2, 2, 3, 10, seed=s) for s in (5, 5, 6))
    for key in ('basis', 'data', 'conds'):
        assert torch.equal(a[key], b[key])
    assert not torch.allclose(a['basis'], c['basis']) and not torch.allclose(a['data'], c['data'])

def test_subspaces_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match='do not fit'):
        molrg.generate_molrg(2, 3, 5, 10) # 15 > 12 dimensions.

def test_a_file_in_the_authors_layout_loads(tmp_path):
    """Their file: basis [K, D, d] float32 over H, W, C pixel order, data NHWC, no seed, a space_basis."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.svd(torch.randn([12, 12], generator=gen)).U
    basis = torch.stack([u[:, :3], u[:, 3:6]])
    data = torch.cat([(basis[k] @ torch.randn([3, 20], generator=gen)).T.reshape(20, 2, 2, 3) for k in range(2)])
    path = str(tmp_path / molrg.dataset_filename(2, 2, 3, 20))
    torch.save(dict(basis=basis, space_basis=u, data=data, class_num=2, sample_per_class=20, per_class_dim=3, resolution=2,
        conds=torch.arange(2).repeat_interleave(20)), path)
    loaded = molrg.load_molrg(path)
    assert loaded.seed is None and loaded.images.shape == (40, 3, 2, 2)
    torch.testing.assert_close(loaded.images, data.permute(0, 3, 1, 2))
    x = flat(loaded.images[20:])
    assert (x - x @ loaded.bases[1] @ loaded.bases[1].T).abs().max() < 1e-5 # Bases reordered like the pixels.
    assert molrg.prepare_molrg(path, 2, 2, 3, 20, seed=123) == 'found' # Unknown seed: accepted.
    with pytest.raises(ValueError, match='per_class_dim 3 \\(asked for 2\\)'):
        molrg.prepare_molrg(path, 2, 2, 2, 20)

def test_an_existing_file_with_another_seed_is_not_silently_reused(small):
    with pytest.raises(ValueError, match='data seed 7 \\(asked for 8\\)'):
        molrg.prepare_molrg(small, 4, 3, 5, 400, seed=8)
    assert molrg.prepare_molrg(small, 4, 3, 5, 400, seed=7) == 'found'

def test_unreadable_files_are_dataset_errors(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'not a torch file')
    torch.save(dict(data=torch.zeros(1)), tmp_path / 'other.pt')
    torch.save(dict(basis=torch.zeros(2, 12, 3), data=torch.zeros(4, 2, 2, 3), conds=[0, 0, 1, 1]), tmp_path / 'list.pt')
    torch.save(dict(basis=torch.zeros(2, 12, 3), data=torch.zeros(4, 2, 2, 3), conds=torch.tensor([0, 0, 1, 2])), tmp_path / 'class.pt')
    for name, message in [('junk.pt', 'Cannot read MoLRG dataset'), ('other.pt', 'no basis, conds'), ('missing.pt', 'not found'),
            ('list.pt', 'conds an integer tensor'), ('class.pt', 'inconsistent MoLRG tensors')]:
        with pytest.raises(DatasetError, match=message):
            molrg.load_molrg(str(tmp_path / name))

def test_the_dataset_gives_back_the_samples_through_the_training_loops_scaling(small):
    data = molrg.load_molrg(small)
    dataset = molrg.MoLRGDataset(small)
    assert len(dataset) == 1200 and dataset.resolution == 4 and dataset.num_channels == 3 and dataset.label_dim == 0 and dataset.name == 'MoLRG'
    images = torch.as_tensor(np.stack([dataset[i][0] for i in range(0, 1200, 37)]))
    torch.testing.assert_close(images / 127.5 - 1, data.images[0:1200:37], rtol=0, atol=1e-6) # What training_loop computes.
    labelled = molrg.MoLRGDataset(small, use_labels=True)
    assert labelled.label_dim == 3 and np.array_equal(labelled[450][1], np.float32([0, 1, 0]))

#----------------------------------------------------------------------------
# The denoiser.

def dense_posterior_mean(bases, x, sigma):
    """Textbook Gaussian conditioning with D x D matrices: sum_k p(k|x) U_k U_k^T Sigma_k^-1 x."""
    dim = bases.shape[1]
    covariances = [u @ u.T + sigma ** 2 * torch.eye(dim, dtype=torch.float64) for u in bases]
    log_likelihoods = torch.stack([torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), c).log_prob(x) for c in covariances], dim=1)
    means = torch.stack([(u @ u.T @ torch.linalg.solve(c, x.T)).T for u, c in zip(bases, covariances)], dim=1)
    return (torch.softmax(log_likelihoods, dim=1)[:, :, None] * means).sum(dim=1)

def test_the_denoiser_is_the_dense_gaussian_posterior_mean_at_every_noise_level(small):
    data = molrg.load_molrg(small)
    denoiser = molrg.MoLRGDenoiser.from_file(small)
    gen = torch.Generator().manual_seed(1)
    clean = data.images[[0, 500, 1000, 1199]].to(torch.float64)
    for sigma in [1e-3, 0.05, 0.5, 2.0, 50.0, 1e3]:
        x = torch.cat([clean + sigma * torch.randn(clean.shape, generator=gen, dtype=torch.float64),
            torch.randn([4, 3, 4, 4], generator=gen, dtype=torch.float64)]) # Near each class, and anywhere.
        expected = dense_posterior_mean(data.bases, flat(x), sigma)
        # The dense reference solves with condition number ~1/sigma^2, which costs it digits at sigma = 1e-3.
        torch.testing.assert_close(flat(denoiser(x, sigma)), expected, rtol=1e-7, atol=1e-9)

def test_the_denoiser_is_the_brute_force_posterior_mean_on_a_tiny_mixture():
    """E[x0 | x] by summing over a fine grid of the coefficients a of each class (d = 2)."""
    mixture = molrg.generate_molrg(2, 3, 2, 1, seed=3)
    bases = molrg.molrg_tensors(mixture).bases
    denoiser = molrg.MoLRGDenoiser(bases, 2)
    grid = torch.linspace(-8, 8, 321, dtype=torch.float64)
    a = torch.cartesian_prod(grid, grid) # [G, 2]; prior weights exp(-|a|^2/2), the same for every class.
    candidates = torch.einsum('ga,kDa->kgD', a, bases) # Every x0 considered, per class.
    log_prior = -0.5 * a.square().sum(dim=1)
    gen = torch.Generator().manual_seed(0)
    for sigma in [0.3, 1.0]:
        x = candidates[1, 50000] + sigma * torch.randn(12, generator=gen, dtype=torch.float64)
        log_w = (log_prior - (x - candidates).square().sum(dim=2) / (2 * sigma ** 2)).reshape(-1)
        w = torch.softmax(log_w, dim=0)
        expected = (w[:, None] * candidates.reshape(-1, 12)).sum(dim=0)
        torch.testing.assert_close(flat(denoiser(x.reshape(1, 3, 2, 2), sigma))[0], expected, rtol=1e-8, atol=1e-10)

def test_near_a_class_the_denoiser_projects_onto_it_and_far_noise_shrinks_to_zero(small):
    data = molrg.load_molrg(small)
    denoiser = molrg.MoLRGDenoiser.from_file(small)
    clean = data.images[[3, 700]].to(torch.float64)
    torch.testing.assert_close(denoiser(clean, 1e-4), clean, rtol=0, atol=1e-6)
    logits, _ = denoiser.class_posterior_logits(flat(clean), 1e-2)
    assert torch.equal(logits.argmax(dim=1), torch.tensor([0, 1]))
    assert denoiser(clean, 1e4).abs().max() < 1e-6

def test_per_sample_noise_levels_equal_separate_calls(small):
    denoiser = molrg.MoLRGDenoiser.from_file(small)
    x = torch.randn([3, 3, 4, 4], dtype=torch.float64)
    sigmas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    together = denoiser(x, sigmas)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], denoiser(x[i:i + 1], sigmas[i]), rtol=1e-12, atol=0)

def test_a_class_label_gives_that_class_alone(small):
    data = molrg.load_molrg(small)
    conditional = molrg.MoLRGDenoiser.from_file(small, conditional=True)
    assert conditional.label_dim == 3 and molrg.MoLRGDenoiser.from_file(small).label_dim == 0
    x = torch.randn([2, 3, 4, 4], dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    u = data.bases[[2, 0]]
    expected = torch.einsum('bDd,bEd,bE->bD', u, u, flat(x)) / (1 + 0.7 ** 2)
    torch.testing.assert_close(flat(conditional(x, 0.7, labels)), expected, rtol=1e-12, atol=1e-14)

def test_jacobian_rank_is_per_class_dim_near_a_class_and_all_classes_at_high_noise(small):
    data = molrg.load_molrg(small)
    denoiser = molrg.MoLRGDenoiser.from_file(small)
    near = data.images[[900]].to(torch.float64) + 0.01 * torch.randn([1, 3, 4, 4], dtype=torch.float64)
    low = jacobian_rank.network_function(denoiser, 0.01)
    assert jacobian_rank.exact_jacobian_rank(low, near)[0] == 5
    assert jacobian_rank.fast_jacobian_rank(low, near, initial_size=8)[0] == 5
    high = jacobian_rank.network_function(denoiser, 50.0)
    assert jacobian_rank.exact_jacobian_rank(high, 50 * torch.randn([1, 3, 4, 4], dtype=torch.float64))[0] == 15

def test_the_sampler_with_the_denoiser_lands_on_the_subspaces_of_both_classes(small):
    data = molrg.load_molrg(small)
    denoiser = molrg.MoLRGDenoiser.from_file(small)
    latents = torch.randn([64, 3, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = flat(sampler_lib.edm_sampler(denoiser, latents, num_steps=32))
    residuals = torch.stack([(samples - samples @ u @ u.T).norm(dim=1) for u in data.bases], dim=1)
    assert (residuals.min(dim=1).values < 1e-2 * samples.norm(dim=1)).all()
    assert set(residuals.argmin(dim=1).tolist()) == {0, 1, 2}

#----------------------------------------------------------------------------
# The command lines.

TINY = ['--img_res=4', '--class_num=2', '--per_class_dim=3', '--sample_per_class=40', '--cbase=4', '--cres=1', '--batch=16',
    '--duration=0.00004', '--tick=0.01', '--augment=0', '--dropout=0', '--lr_rampup=0', '--workers=0', '--device=cpu', '--seed=1']

def run_train(tmp_path, *args):
    return CliRunner().invoke(trainMoLRG.main, [f'--outdir={tmp_path / "training"}', f'--path={tmp_path / "datasets"}', *TINY, *args])

def test_trainmolrg_generates_the_dataset_once_and_trains_on_it(tmp_path):
    result = run_train(tmp_path)
    assert result.exit_code == 0, result.output + repr(result.exception)
    data_path = tmp_path / 'datasets' / 'MoLRG_dataset_resolution4_classnum2_perclassdim3_sample40.pt'
    assert data_path.is_file() and molrg.load_molrg(str(data_path)).seed == 0
    runs = tmp_path / 'training' / 'MoLRG_dataset_resolution4_classnum2_perclassdim3_sample40'
    (run,) = os.listdir(runs)
    assert run == '00000-MoLRG-uncond-ddpmpp-edm-gpus1-batch16-fp32'
    with open(runs / run / 'training_options.json') as f:
        options = json.load(f)
    assert options['dataset_kwargs']['class_name'] == 'training.molrg.MoLRGDataset' and options['network_kwargs']['model_channels'] == 4
    snapshots = sorted(name for name in os.listdir(runs / run) if name.startswith('network-snapshot-'))
    net = checkpoint.load_network(str(runs / run / snapshots[-1]))
    assert (net.img_resolution, net.img_channels, net.label_dim) == (4, 3, 0)

    # A second run reuses the file; with --cond=1 the network is conditioned on the class.
    before = data_path.read_bytes()
    again = run_train(tmp_path, '--cond=1')
    assert again.exit_code == 0 and 'Using existing MoLRG dataset' in again.output
    assert data_path.read_bytes() == before
    conditional_run = runs / '00001-MoLRG-cond-ddpmpp-edm-gpus1-batch16-fp32'
    snapshot = sorted(name for name in os.listdir(conditional_run) if name.startswith('network-snapshot-'))[-1]
    assert checkpoint.load_network(str(conditional_run / snapshot)).label_dim == 2

def test_trainmolrg_trains_with_plain_sgd_when_asked(tmp_path):
    result = run_train(tmp_path, '--optimizer=sgd', '--lr=0.01')
    assert result.exit_code == 0, result.output + repr(result.exception)
    (run,) = (tmp_path / 'training' / 'MoLRG_dataset_resolution4_classnum2_perclassdim3_sample40').iterdir()
    options = json.load(open(run / 'training_options.json'))
    assert options['optimizer_kwargs'] == {'class_name': 'torch.optim.SGD', 'lr': 0.01}
    (state_file,) = [f for f in os.listdir(run) if f.startswith('training-state-')]
    state = torch.load(run / state_file, weights_only=False)
    assert 'momentum_buffer' not in str(state['optimizer_state']['state']) and 'exp_avg' not in str(state['optimizer_state']['state'])
    assert state['optimizer_state']['param_groups'][0]['momentum'] == 0

@pytest.mark.parametrize('args, message', [
    (['--per_class_dim=30'], 'do not fit into 3x4x4 = 48 dimensions'),
    (['--data_seed=5'], 'already exists with data seed 0 (asked for 5)'),
])
def test_trainmolrg_bad_input_gives_one_line_and_no_run(tmp_path, args, message):
    if '--data_seed=5' in args:
        molrg.prepare_molrg(str(tmp_path / 'datasets' / molrg.dataset_filename(4, 2, 3, 40)), 4, 2, 3, 40, seed=0)
    result = run_train(tmp_path, *args)
    assert result.exit_code != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('Error: ') and message in last_line
    assert not (tmp_path / 'training').exists()

def test_jacobian_cli_on_the_mixture_goes_from_all_classes_to_one(tmp_path, small):
    result = CliRunner().invoke(jacobian.main, ['--device=cpu', f'--molrg={small}', '--steps=6', f'--outdir={tmp_path}'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    with open(tmp_path / 'jacobian-rank.json') as f:
        steps = json.load(f)['steps']
    assert steps[0]['rank'] == 15 and steps[-1]['rank'] == 5

@pytest.mark.parametrize('args, message', [
    (['--molrg=MOLRG', '--network_pkl=x.pkl'], '--molrg replaces the network'),
    (['--molrg=MOLRG', '--class=3'], 'out of range: the network has 3 classes'),
    (['--molrg=missing.pt'], 'MoLRG dataset not found: missing.pt'),
])
def test_jacobian_cli_bad_molrg_input_gives_one_line(tmp_path, small, args, message):
    args = [arg.replace('MOLRG', small) for arg in args]
    result = CliRunner().invoke(jacobian.main, ['--device=cpu', *args, f'--outdir={tmp_path / "out"}'])
    assert result.exit_code != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('Error: ') and message in last_line
    assert not (tmp_path / 'out').exists()

def test_generate_cli_samples_the_mixture_with_its_denoiser(tmp_path, small):
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--molrg={small}', '--seeds=0-3', '--class=2', f'--outdir={tmp_path / "out"}'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert sorted(os.listdir(tmp_path / 'out')) == ['000000.png', '000001.png', '000002.png', '000003.png']
    assert (tmp_path / 'out-grid.png').is_file()
    bad = CliRunner().invoke(generate.main, ['--device=cpu', f'--molrg={small}', '--optimal_denoiser', f'--outdir={tmp_path / "bad"}'])
    assert bad.exit_code != 0 and bad.stderr.strip().splitlines()[-1].startswith('Error: --optimal_denoiser and --molrg')

class CountingNet:
    """Wraps a network and records, per call, the batch size and whether gradients were on."""
    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.net(x, sigma, labels, augment_labels=augment_labels)

@pytest.mark.parametrize('num_steps', [2, 6])
def test_a_cdm_step_evaluates_the_network_num_steps_more_times_on_twice_the_batch(num_steps):
    # Why the benchmark's CDM step is slower than EDM's, as a count that cannot flake with machine load.
    from conftest import make_tiny_net
    from training import loss as loss_lib
    images = torch.zeros(4, 3, 8, 8)
    edm, cdm = CountingNet(make_tiny_net()), CountingNet(make_tiny_net())
    loss_lib.EDMLoss()(net=edm, images=images)
    loss_lib.MartingaleLoss(martingale_lambda=1, num_steps=num_steps)(net=cdm, images=images)
    assert edm.calls == [(4, True)]
    # The EDM term, num_steps - 1 reverse SDE steps of both trajectories without gradient, then both ends with gradient.
    assert cdm.calls == [(4, True)] + [(8, False)] * (num_steps - 1) + [(8, True)]
    assert sum(n for n, _ in cdm.calls) == (2 * num_steps + 1) * sum(n for n, _ in edm.calls) # 13x the samples at the default 6.

@pytest.mark.slow
def test_the_speed_benchmark_times_edm_and_cdm_through_train_py(tmp_path):
    # Only that it runs and prints consistent figures: which method is faster is a wall-clock
    # matter, left to the count above.
    path = str(tmp_path / 'tiny.pt')
    molrg.save_molrg(path, molrg.generate_molrg(4, 2, 3, 32, seed=0))
    result = run_cli([sys.executable, os.path.join(REPO, 'benchmarks', 'training_speed.py'), f'--data={path}', '--cbase=8', '--cres=1,1',
        '--batch=32', '--kimg=0.128', '--tick=0.032', '--repeats=1', '--martingale_steps=6'])
    assert result.returncode == 0, result.stdout + result.stderr
    rates = {name: float(value) for name, value in re.findall(r'^  (edm|cdm): +([0-9.e+-]+) kimg/s', result.stdout, flags=re.M)}
    ratio = float(re.search(r'cdm/edm step time: ([0-9.]+)x', result.stdout).group(1))
    assert set(rates) == {'edm', 'cdm'} and all(rate > 0 for rate in rates.values())
    assert ratio == pytest.approx(rates['edm'] / rates['cdm'], rel=0.02)

#----------------------------------------------------------------------------

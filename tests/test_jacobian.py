"""jacobian.py and training/evaluation/jacobian_rank.py: the effective rank, exact and fast Jacobians, the CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import jacobian
from conftest import legacy_networks_module, make_tiny_net, save_tiny_snapshot
from tiny_models import random_images, write_image_folder
from training import bundled
from training.evaluation import jacobian_rank
from training.sampling import sampler as sampler_lib
from training.sampling.optimal_denoiser import OptimalDenoiser

#----------------------------------------------------------------------------
# The rank definition.

def test_energy_rank_is_the_smallest_k_holding_99_percent_of_the_norm():
    assert jacobian_rank.energy_rank([3.0]) == 1
    assert jacobian_rank.energy_rank([10.0, 1.0, 0.5]) == 1 # 10 > 0.99 * sqrt(101.25) = 9.96.
    assert jacobian_rank.energy_rank([3.0, 4.0]) == 2       # 4 < 0.99 * 5.
    assert jacobian_rank.energy_rank([1.0] * 100) == 99     # sqrt(k) > 0.99 * 10 first at k = 99 (98.01 < 99).
    assert jacobian_rank.energy_rank([1.0] * 50 + [0.0] * 50) == 50
    assert jacobian_rank.energy_rank([0.0, 0.0]) == 0
    assert jacobian_rank.energy_rank([0.5, 2.0, 1.0]) == jacobian_rank.energy_rank([2.0, 1.0, 0.5]) # Order does not matter.

#----------------------------------------------------------------------------
# Exact and fast ranks of denoisers with a known Jacobian.

def linear_denoiser(singular_values, shape=(1, 3, 8, 8), seed=0):
    """D(x) = U diag(s) V^T x: a denoiser whose Jacobian has exactly these singular values."""
    n = int(np.prod(shape))
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn([n, n], generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn([n, n], generator=gen, dtype=torch.float64)).Q
    s = torch.zeros(n, dtype=torch.float64)
    s[:len(singular_values)] = torch.as_tensor(singular_values, dtype=torch.float64)
    matrix = u @ torch.diag(s) @ v.T
    return lambda x: (matrix @ x.reshape(-1).to(torch.float64)).reshape(x.shape)

SPECTRA = {
    'rank 5':                 [1.0] * 5,
    'rank 5 with a tail':     [1.0] * 5 + [1e-3] * 100,
    'decaying':               [0.8 ** k for k in range(60)],
    'rank 150 of 192':        [1.0] * 150,
    'full':                   list(np.linspace(2, 1, 192)),
}

@pytest.mark.parametrize('spectrum', list(SPECTRA))
def test_exact_and_fast_ranks_of_a_linear_denoiser_are_its_known_rank(spectrum):
    values = SPECTRA[spectrum]
    denoise = linear_denoiser(values)
    x = torch.randn([1, 3, 8, 8], dtype=torch.float64)
    expected = jacobian_rank.energy_rank(values)
    rank, singular_values = jacobian_rank.exact_jacobian_rank(denoise, x)
    assert rank == expected
    torch.testing.assert_close(singular_values[:len(values)], torch.as_tensor(sorted(values, reverse=True), dtype=torch.float64), rtol=1e-9, atol=1e-9)
    fast_rank, _ = jacobian_rank.fast_jacobian_rank(denoise, x, generator=torch.Generator().manual_seed(1))
    assert fast_rank == expected

def test_known_ranks_by_hand():
    x = torch.zeros([1, 3, 8, 8], dtype=torch.float64)
    assert jacobian_rank.exact_jacobian_rank(linear_denoiser([1.0] * 5), x)[0] == 5
    assert jacobian_rank.fast_jacobian_rank(linear_denoiser([1.0] * 5), x)[0] == 5
    assert jacobian_rank.fast_jacobian_rank(linear_denoiser([]), x)[0] == 0

def test_the_fast_rank_needs_far_fewer_products_than_the_exact_one_when_the_rank_is_low():
    calls = []
    base = linear_denoiser([1.0] * 5 + [1e-3] * 100, shape=(1, 3, 16, 16))
    def counting(x):
        calls.append(x.shape)
        return base(x)
    rank, _ = jacobian_rank.fast_jacobian_rank(counting, torch.zeros([1, 3, 16, 16], dtype=torch.float64), chunk_size=1)
    assert rank == 5
    assert len(calls) < 3 * 32 + 16 + 10 # One sketch of 32 columns: far below the 768 products of the full Jacobian.

@pytest.mark.slow
def test_fast_rank_agrees_with_exact_rank_on_a_network_with_a_low_rank_jacobian():
    # A network seen through a 16-dimensional subspace: nonlinear, rank <= 16 of 192, so the
    # sketch (not the exact fallback) decides.
    net = make_tiny_net(label_dim=4)
    labels = torch.eye(4)[[1]]
    basis = torch.linalg.qr(torch.randn([192, 16], dtype=torch.float64, generator=torch.Generator().manual_seed(4))).Q
    project = lambda v: (basis @ (basis.T @ v.reshape(-1))).reshape(v.shape)
    x = torch.randn([1, 3, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for sigma in [0.05, 1.0, 20.0]:
        network = jacobian_rank.network_function(net, sigma, labels)
        denoise = lambda v: project(network(project(v)))
        exact, _ = jacobian_rank.exact_jacobian_rank(denoise, x * sigma)
        fast, sketched_values = jacobian_rank.fast_jacobian_rank(denoise, x * sigma)
        assert fast == exact and 1 <= exact <= 16
        assert len(sketched_values) < 192 # Decided by a sketch, not by the exact fallback.

def test_the_optimal_denoiser_of_k_images_has_rank_below_k():
    images = torch.as_tensor(random_images(6, resolution=8, seed=1)).permute(0, 3, 1, 2)
    denoiser = OptimalDenoiser(images)
    x = images[:1].to(torch.float64) / 127.5 - 1 + 0.5 * torch.randn([1, 3, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in [0.3, 1.0, 5.0]:
        denoise = lambda v: denoiser(v, sigma)
        rank, singular_values = jacobian_rank.exact_jacobian_rank(denoise, x)
        assert 1 <= rank <= 5 and singular_values[5:].abs().max() < 1e-9 # J = Cov_w(y) / sigma^2 has rank <= k - 1.
        assert jacobian_rank.fast_jacobian_rank(denoise, x)[0] == rank

def test_vmapped_jacobian_equals_the_per_pixel_backward_loop_on_a_network():
    net = make_tiny_net(label_dim=4)
    labels = torch.eye(4)[[2]]
    x = torch.randn([1, 3, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    denoise = jacobian_rank.network_function(net, 2.0, labels)
    looped = torch.autograd.functional.jacobian(lambda v: denoise(v).reshape(-1), x).reshape(192, 192)
    torch.testing.assert_close(jacobian_rank.jacobian_matrix(denoise, x, chunk_size=50), looped, rtol=1e-6, atol=1e-7)

#----------------------------------------------------------------------------
# Along a trajectory.

def test_the_trajectory_visits_the_edm_noise_levels():
    net = make_tiny_net()
    latents = torch.randn([1, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    points = jacobian_rank.sampling_trajectory(net, latents, num_steps=5)
    expected = sampler_lib.edm_time_steps(net, num_steps=5)[:-1]
    assert [sigma for _x, sigma in points] == pytest.approx(expected.tolist(), rel=1e-12)
    torch.testing.assert_close(points[0][0], latents.to(torch.float64) * 80)

@pytest.fixture(scope='module')
def cond_pkl(tmp_path_factory):
    return save_tiny_snapshot(tmp_path_factory.mktemp('jac') / 'cond.pkl', make_tiny_net(label_dim=4))

def run_jacobian(*args):
    return CliRunner().invoke(jacobian.main, ['--device=cpu', *map(str, args)])

def run_ok(*args):
    result = run_jacobian(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def test_cli_prints_ranks_per_step_and_writes_json_and_plot(tmp_path, cond_pkl):
    result = run_ok('--network_pkl', cond_pkl, '--class=1', '--steps=4', '--outdir', tmp_path)
    lines = [line for line in result.stdout.splitlines() if line.startswith('SNR 1/sigma: ')]
    assert len(lines) == 4
    with open(tmp_path / 'jacobian-rank.json') as f:
        summary = json.load(f)
    assert summary['mode'] == 'exact' and summary['dim'] == 192 and summary['class_idx'] == 1 and len(summary['steps']) == 4
    for line, step in zip(lines, summary['steps']):
        assert line == f'SNR 1/sigma: {step["snr"]:.3f}, rank: {step["rank"]}'
        assert 1 <= step['rank'] <= 192 and step['snr'] == pytest.approx(1 / step['sigma'])
    assert summary['steps'][0]['sigma'] == pytest.approx(80) and summary['steps'][-1]['sigma'] == pytest.approx(0.002)
    assert (tmp_path / 'jacobian-rank.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

@pytest.mark.slow
def test_fast_mode_agrees_with_exact_mode_on_a_network(tmp_path, cond_pkl):
    common = ['--network_pkl', cond_pkl, '--class=3', '--steps=3', '--seed=2', '--sigma_max=20']
    run_ok(*common, '--outdir', tmp_path / 'exact')
    run_ok(*common, '--outdir', tmp_path / 'fast', '--fast')
    exact = json.load(open(tmp_path / 'exact' / 'jacobian-rank.json'))['steps']
    fast = json.load(open(tmp_path / 'fast' / 'jacobian-rank.json'))['steps']
    assert [s['rank'] for s in fast] == [s['rank'] for s in exact]

def test_a_pickle_with_nvidias_old_style_attention_is_rebuilt_and_works(tmp_path):
    # torch.func rejects the autograd.Function attention of NVIDIA's networks.py; loading rebuilds it.
    legacy = make_tiny_net(label_dim=0, networks_module=legacy_networks_module())
    path = save_tiny_snapshot(tmp_path / 'legacy.pkl', legacy)
    result = run_ok('--network_pkl', path, '--steps=2', '--outdir', tmp_path)
    assert result.stdout.count('SNR 1/sigma: ') == 2

def test_the_optimal_denoiser_of_a_dataset_has_a_rank_below_its_number_of_images(tmp_path):
    data = write_image_folder(tmp_path / 'data', random_images(5, resolution=8, seed=2))
    run_ok('--optimal_denoiser', '--dataset', data, '--steps=6', '--sigma_max=5', '--outdir', tmp_path / 'out')
    summary = json.load(open(tmp_path / 'out' / 'jacobian-rank.json'))
    assert summary['dataset'] == str(data) and summary['network'] is None and summary['dim'] == 192
    ranks = [step['rank'] for step in summary['steps']]
    assert all(0 <= rank <= 4 for rank in ranks) # J = Cov_w(y) / sigma^2: rank <= 5 - 1.
    assert ranks[-1] == 0 # At sigma = 0.002 the weights sit on one image: D is locally constant.

@pytest.mark.slow
def test_without_a_denoiser_the_bundled_network_is_measured(tmp_path):
    result = run_ok('--steps=2', '--outdir', tmp_path)
    summary = json.load(open(tmp_path / 'jacobian-rank.json'))
    assert summary['network'] == bundled.NETWORK and summary['dim'] == 256 and len(summary['steps']) == 2
    assert f'Loading network from "{bundled.NETWORK}"' in result.stdout

@pytest.mark.parametrize('args, message', [
    (['--network_pkl', 'nope.pkl'], 'Network file not found'),
    (['--class=7'], 'out of range: the network has 4 classes'),
    (['--optimal_denoiser'], '--optimal_denoiser needs --dataset'),
    (['--dataset', 'data.zip'], '--dataset is only used with --optimal_denoiser'),
    (['--optimal_denoiser', '--molrg', 'x.pt', '--dataset', 'data.zip'], 'two different denoisers; give one'),
    (['--optimal_denoiser', '--dataset', 'nope.zip'], 'Dataset not found'),
])
def test_bad_input_gives_one_line(tmp_path, cond_pkl, args, message):
    if '--network_pkl' not in args:
        args = ['--network_pkl', cond_pkl, *args]
    result = run_jacobian(*args, '--outdir', tmp_path / 'out')
    assert result.exit_code != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('Error: ') and message in last_line
    assert not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------

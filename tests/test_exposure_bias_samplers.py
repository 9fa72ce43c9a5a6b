"""Epsilon scaling and time shift: small parts of the one sampler, each checked on its own."""

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import eps_norm
import generate
from conftest import make_tiny_net, run_cli
from test_sampler import LATENTS, GaussianDataNet, exact_result, relative_error
from training.sampling import epsilon_scaling
from training.evaluation import exposure_bias_metrics as metrics
from training.sampling import sampler
from training.sampling import time_shift

#----------------------------------------------------------------------------
# Epsilon scaling.

def test_scaler_one_is_the_plain_sampler_to_the_bit():
    net = make_tiny_net(label_dim=2)
    labels = torch.eye(2)[[0, 1, 1, 0]]
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = sampler.edm_sampler(net, latents, labels, num_steps=5)
    denoise = epsilon_scaling.with_epsilon_scaling(sampler.network_denoiser(net, labels), eps_scaler=1.0, kappa=0.0)
    assert torch.equal(sampler.edm_sampler(net, latents, labels, num_steps=5, denoise=denoise), plain)
    assert not torch.equal(sampler.edm_sampler(net, latents, labels, num_steps=5,
        denoise=epsilon_scaling.with_epsilon_scaling(sampler.network_denoiser(net, labels), eps_scaler=1.001)), plain)

def test_scaled_euler_step_matches_a_hand_computed_step():
    net = GaussianDataNet(c=0.5)
    x0 = LATENTS.to(torch.float64) * 2.0 # At sigma 2, stepping to sigma 1, scaler 1.25.
    denoise = epsilon_scaling.with_epsilon_scaling(sampler.network_denoiser(net), eps_scaler=1.25)
    t_steps = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    # One Euler step by hand: eps = (x - D) / sigma, D = c^2 / (c^2 + sigma^2) x; x1 = x0 + (1 - 2) eps / 1.25.
    eps = (x0 - 0.25 / 4.25 * x0) / 2.0
    x1 = x0 + (1.0 - 2.0) * eps / 1.25
    eps1 = (x1 - 0.25 / 1.25 * x1) / 1.0
    x2 = x1 + (0.0 - 1.0) * eps1 / 1.25
    result = sampler.sample(denoise, LATENTS, t_steps, solver='euler')
    assert torch.allclose(result, x2, rtol=1e-6, atol=1e-6)

def test_kappa_gives_each_step_its_scaler_for_both_heun_evaluations():
    used = []
    def denoise(x, sigma, step):
        used.append((step, float(torch.as_tensor(sigma).reshape(-1)[0])))
        return torch.zeros_like(x)
    scaled = epsilon_scaling.with_epsilon_scaling(denoise, eps_scaler=1.0, kappa=0.5)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    for step in range(3):
        assert torch.allclose(scaled(x, torch.tensor(1.0), step), x - x / (1.0 + 0.5 * step))
    net = GaussianDataNet()
    used.clear()
    sampler.edm_sampler(net, LATENTS, num_steps=4, denoise=scaled)
    assert [step for step, _ in used] == [0, 0, 1, 1, 2, 2, 3] # Heun: two evaluations per step, one at the end.

@pytest.mark.parametrize('scaling', ['none', 'vp'])
def test_scaled_sampler_solves_the_scaled_ode_with_and_without_vp_scaling(scaling):
    # For N(0, c^2 I) data, dividing eps = sigma x / (c^2 + sigma^2) by lambda gives the ODE
    # dx/dsigma = sigma x / (lambda (c^2 + sigma^2)), solved by x(0) = x(sigma_max) (c^2 / (c^2 + sigma_max^2))^(1 / (2 lambda)).
    # Under --scaling=vp this holds only if eps is formed from x / s(t), not from the scaled state.
    net, c, sigma_max, scaler = GaussianDataNet(c=0.5), 0.5, 80.0, 1.05
    x = sampler.ablation_sampler(net, LATENTS, num_steps=64, scaling=scaling, solver='heun',
        denoise=epsilon_scaling.with_epsilon_scaling(sampler.network_denoiser(net), eps_scaler=scaler))
    exact = LATENTS.to(torch.float64) * sigma_max * (c ** 2 / (c ** 2 + sigma_max ** 2)) ** (1 / (2 * scaler))
    assert relative_error(x, exact) < 5e-3
    assert relative_error(exact, exact_result(LATENTS, sigma_max)) > 0.2 # The scaling changes the result a lot.

@pytest.mark.parametrize('eps_scaler,kappa,steps', [(0, 0, 10), (-1, 0, 10), (1.0, -0.2, 10)])
def test_non_positive_scalers_are_refused(eps_scaler, kappa, steps):
    with pytest.raises(ValueError):
        epsilon_scaling.check_eps_scaler(eps_scaler, kappa, steps)

#----------------------------------------------------------------------------
# Time shift.

def test_window_is_centred_cut_at_the_top_and_starts_at_zero_near_the_bottom():
    assert time_shift.window_candidates(500, 80, 1000).tolist() == list(range(460, 541))
    assert time_shift.window_candidates(990, 80, 1000).tolist() == list(range(950, 1000))
    assert time_shift.window_candidates(30, 80, 1000).tolist() == list(range(0, 81))

def test_best_match_is_the_argmin_inside_the_window():
    targets = torch.linspace(0, 1, 1000, dtype=torch.float64)
    candidates = time_shift.window_candidates(500, 80, 1000)
    variance = torch.tensor([targets[470].item(), 0.0, 1.0, (targets[520] + 1e-9).item()], dtype=torch.float64)
    chosen = time_shift.best_matching_index(variance, candidates, targets)
    assert chosen.tolist() == [470, 460, 540, 520] # Far values saturate at the window's ends.

class VarianceProbe(GaussianDataNet):
    """Gaussian-data network that lets the test see the sigmas the sampler evaluates."""
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sigmas = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).clone())
        return super().forward(x, sigma, class_labels)

@pytest.mark.parametrize('rule', ['paper', 'released'])
def test_shifts_stay_in_the_window_and_never_happen_at_or_below_the_cutoff(rule):
    net = VarianceProbe(c=0.9) # Data variance 0.81 makes the VP variance miss 1 - abar: shifts happen.
    grid = time_shift.TrainingGrid.vp()
    shift = time_shift.TimeShift(grid, num_steps=10, cutoff=300, window=80, rule=rule)
    latents = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_steps=10, solver='euler', discretization='vp', schedule='vp', scaling='vp')
    sampler.ablation_sampler(net, latents, time_shift=shift, **kwargs)
    sigma_steps, _ = sampler.ablation_sigma_steps(net, num_steps=10, discretization='vp')
    scheduled = grid.index_of(sigma_steps)
    assert len(shift.shifted_indices) > 0
    for step, chosen in shift.shifted_indices.items():
        k = int(scheduled[step])
        assert step > 0 and k > 300
        assert chosen.min() >= k - 40 and chosen.max() <= k + 40
    assert all(int(scheduled[step]) <= 300 for step in range(10) if step not in shift.shifted_indices and step > 0)
    assert any((chosen != scheduled[step]).any() for step, chosen in shift.shifted_indices.items())

@pytest.mark.parametrize('rule', ['paper', 'released'])
def test_nothing_above_the_cutoff_is_the_plain_sampler_to_the_bit(rule):
    net = GaussianDataNet()
    kwargs = dict(num_steps=8, solver='euler', discretization='vp', schedule='vp', scaling='vp')
    plain = sampler.ablation_sampler(net, LATENTS, **kwargs)
    shift = time_shift.TimeShift(time_shift.TrainingGrid.vp(), num_steps=8, cutoff=1000, window=80, rule=rule)
    assert torch.equal(sampler.ablation_sampler(net, LATENTS, time_shift=shift, **kwargs), plain)

def test_paper_rule_evaluates_the_denoiser_at_the_shifted_time():
    net = VarianceProbe(c=0.9)
    shift = time_shift.TimeShift(time_shift.TrainingGrid.vp(), num_steps=10, cutoff=300, window=80, rule='paper')
    sampler.edm_sampler(net, torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(4)), num_steps=10, time_shift=shift)
    step, chosen = next(iter(shift.shifted_indices.items()))
    evaluated = net.sigmas[2 * step] # Heun: two evaluations per step.
    assert torch.allclose(evaluated, time_shift.TrainingGrid.vp().sigmas[chosen])

def test_released_rule_lands_below_the_chosen_index_by_the_stride():
    grid = time_shift.TrainingGrid.vp()
    shift = time_shift.TimeShift(grid, num_steps=5, cutoff=300, window=80, rule='released')
    ode = sampler.ablation_ode('vp', 'vp')
    t = ode.sigma_inv(torch.tensor(grid.sigmas[700].item(), dtype=torch.float64))
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    _x, _t, t_land = shift.before_step(1, x, t, t * 0.5, ode)
    k_s = shift.shifted_indices[1]
    assert torch.allclose(ode.sigma(t_land).reshape(-1), grid.sigmas[k_s - 1000 // 4 - 1])

#----------------------------------------------------------------------------
# Diagnostics and calibration.

def test_fits_recover_known_scalers():
    single = np.array([16.0, 15.0, 12.0, 6.0, 1.0])
    assert metrics.fit_constant_scaler(single * 1.004, single) == pytest.approx(1.004)
    a, kappa = metrics.fit_linear_scaler(single * (1.001 + 0.002 * np.arange(5)), single)
    assert a == pytest.approx(1.001) and kappa == pytest.approx(0.002)

def test_consecutive_norms_measure_the_mismatch_of_a_miscalibrated_denoiser():
    # The network is the exact denoiser of N(0, 0.6^2) while the training data is N(0, 0.4^2): along
    # its own trajectories x_sigma ~ N(0, 0.36 + sigma^2), on training inputs N(0, 0.16 + sigma^2), so
    # the norm ratio at sigma is sqrt((0.36 + sigma^2) / (0.16 + sigma^2)).
    net = GaussianDataNet(c=0.6)
    images = np.clip(np.random.RandomState(0).randn(4000, 1, 4, 4) * 0.4 * 127.5 + 127.5, 0, 255).round().astype(np.uint8)
    data_variance = (images / 127.5 - 1).var() # 0.4^2, less a little for clipping.
    result = metrics.measure(net, images, None, list(range(2000)), dict(num_steps=40), batch_size=500)
    sigma = np.array(result['sigma'])
    measured = np.array(result['eps_norm_consecutive']) / np.array(result['eps_norm_single_step'])
    expected = np.sqrt((0.36 + sigma ** 2) / (data_variance + sigma ** 2))
    assert np.allclose(measured, expected, rtol=0.015)
    assert measured[-1] > 1.4 # Clearly larger than 1 at low noise.

def test_calibration_finds_the_scaler_whose_scaled_norms_match_the_training_norms():
    # The same miscalibrated denoiser: at the calibrated scaler the scaled norms along its own
    # trajectories fit the single-step norms (log of the least-squares ratio at 0), far better than
    # without scaling.
    net = GaussianDataNet(c=0.6)
    images = np.clip(np.random.RandomState(0).randn(500, 1, 4, 4) * 0.4 * 127.5 + 127.5, 0, 255).round().astype(np.uint8)
    seeds, kwargs = list(range(500)), dict(num_steps=8, solver='euler')
    fitted, history, _measured = metrics.calibrate(net, images, None, seeds, kwargs, rounds=4, batch_size=500)
    assert len(history) == 4 and fitted['eps_scaler'] != 1.0
    def log_mismatch(scaler):
        result = metrics.measure(net, images, None, seeds, kwargs, scaler, 0.0, batch_size=500)
        return np.log(metrics.fit_constant_scaler(result['eps_norm_consecutive_scaled'], result['eps_norm_single_step']))
    assert abs(log_mismatch(fitted['eps_scaler'])) < 1e-5 and abs(log_mismatch(1.0)) > 1e-3

def write_tiny_dataset(folder, n=16):
    folder.mkdir(parents=True, exist_ok=True)
    rnd = np.random.RandomState(0)
    entries = []
    for i in range(n):
        PIL.Image.fromarray(rnd.randint(0, 256, size=[8, 8, 3]).astype(np.uint8)).save(folder / f'{i}.png')
        entries.append([f'{i}.png', i % 4])
    (folder / 'dataset.json').write_text(json.dumps(dict(labels=entries)))
    return str(folder)

def test_eps_norm_cli_measures_calibrates_and_plots(tmp_path, cond_net_pkl):
    data = write_tiny_dataset(tmp_path / 'data')
    result = CliRunner().invoke(eps_norm.main, [f'--network={cond_net_pkl}', f'--data={data}', f'--outdir={tmp_path / "out"}',
        '--num=16', '--steps=4', '--solver=euler', '--calibrate', '--rounds=1', '--device=cpu'])
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'out' / 'eps_norm.json') as f:
        curves = json.load(f)
    assert len(curves['eps_norm_consecutive']) == 4 and all(v > 0 for v in curves['eps_norm_single_step'])
    assert curves['calibration']['eps_scaler'] > 0
    assert 'generate.py' in result.output and '--eps_scaler=' in result.output and '--kappa=' in result.output
    assert PIL.Image.open(tmp_path / 'out' / 'eps_norm.png').size[0] > 500
    assert (tmp_path / 'out' / 'eps_norm.csv').read_text().count('\n') == 5

#----------------------------------------------------------------------------
# Through generate.py.

@pytest.mark.slow
def test_seed_commands_run_as_written(tmp_path, uncond_net_pkl):
    for extra in [['--steps=18', '--eps_scaler=1.0006'], ['--steps=13', '--solver=euler', '--eps_scaler=1.0048']]:
        result = run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'generate.py',
            f'--outdir={tmp_path / "out"}', '--batch', '512', '--seeds=0-3', f'--network={uncond_net_pkl}', '--device=cpu', *extra])
        assert result.returncode == 0, result.stderr
    assert len([f for f in os.listdir(tmp_path / 'out') if f.endswith('.png')]) == 4 # 4 images; the grid goes beside them.
    assert (tmp_path / 'out-grid.png').is_file() and (tmp_path / 'out-settings.json').is_file()

def test_generate_with_scaler_one_writes_the_plain_images(tmp_path, cond_net_pkl):
    for name, extra in [('plain', []), ('es1', ['--eps_scaler=1', '--kappa=0'])]:
        assert CliRunner().invoke(generate.main, ['--device=cpu', f'--network={cond_net_pkl}', f'--outdir={tmp_path / name}', '--seeds=0-3', '--steps=4', *extra]).exit_code == 0
    for seed in range(4):
        assert (tmp_path / 'plain' / f'{seed:06d}.png').read_bytes() == (tmp_path / 'es1' / f'{seed:06d}.png').read_bytes()

@pytest.mark.parametrize('args,message', [
    (['--eps_scaler=0'], '--eps_scaler must be positive'),
    (['--eps_scaler=1', '--kappa=-1'], 'every scaler must be positive'),
    (['--do_time_shift', '--window=0', '--ts_rule=paper'], '--window must be at least 1'),
    (['--do_time_shift', '--cutoff=1001', '--ts_rule=paper'], '--cutoff must be in [0, 1000]'),
    (['--do_time_shift', '--ts_rule=released'], 'add --solver=euler'),
    (['--do_time_shift', '--ts_rule=released', '--solver=euler'], 'use --ts_rule=paper'),
    (['--do_time_shift', '--ts_rule=paper', '--S_churn=5'], 'deterministic sampling only'),
])
def test_bad_sampler_settings_get_one_line(tmp_path, cond_net_pkl, args, message):
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={cond_net_pkl}', f'--outdir={tmp_path / "out"}', *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / 'out').exists()

def test_time_shift_and_epsilon_scaling_compose_in_generate(tmp_path, uncond_net_pkl):
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={uncond_net_pkl}', f'--outdir={tmp_path / "out"}',
        '--seeds=0-3', '--steps=6', '--solver=euler', '--disc=vp', '--schedule=vp', '--scaling=vp', '--do_time_shift', '--eps_scaler=1.002'])
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path / 'out')) == 4 and (tmp_path / 'out-grid.png').is_file() # The grid sits beside the images.

#----------------------------------------------------------------------------

"""A researcher's chain of commands, as the README gives them: outputs that chain, runs that describe
themselves, calibration that says when it failed, and nothing written into the source tree."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import eps_norm
import fid
import generate
from tests.conftest import REPO, run_cli
from tests.test_study import tiny_study_inputs # noqa: F401 (a fixture)
from training import bundled
from training import run_record

#----------------------------------------------------------------------------

def invoke_ok(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

@pytest.mark.slow
def test_readme_generate_then_fid_calc_chain_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    invoke_ok(generate.main, ['--outdir=out', '--seeds=0-63', '--device=cpu'])
    assert sorted(os.listdir('out')) == [f'{seed:06d}.png' for seed in range(64)] # Only the images...
    assert os.path.isfile('out-grid.png') and os.path.isfile('out-settings.json') # ...the rest beside them.
    result = invoke_ok(fid.main, ['calc', '--images=out', f'--ref={bundled.REF}', '--num=64', '--device=cpu', '--workers=0'])
    assert float(result.output.strip().splitlines()[-1]) > 0

@pytest.mark.slow
def test_generate_settings_name_every_value_that_changes_the_images(tmp_path):
    out = tmp_path / 'out'
    invoke_ok(generate.main, ['--preset=edm-es-cifar10-cond-heun-nfe35', f'--network={bundled.NETWORK}', f'--outdir={out}', '--seeds=0-1,5',
        '--class=3', '--device=cpu'])
    settings = json.loads((tmp_path / 'out-settings.json').read_text())
    assert settings['preset'] == 'edm-es-cifar10-cond-heun-nfe35'
    assert settings['eps_scaling'] == dict(eps_scaler=1.0006, kappa=0.0) # Expanded from the preset.
    assert settings['sampler']['num_steps'] == 18 and len(settings['sampler']['sigma_steps']) == 18
    assert settings['sampler']['S_churn'] == 0 and settings['sampler']['rho'] == 7
    assert settings['network']['sha256'] == run_record.sha256(bundled.NETWORK)
    assert settings['seeds'] == '0-1,5' and settings['class_idx'] == 3
    assert settings['time_shift'] is None and settings['discriminator_guidance'] is None
    assert 'code_version' in settings

def test_records_name_the_checkouts_own_files_relative_to_it(tmp_path, monkeypatch):
    # A record committed from one checkout must not name another's folders (the bundled defaults are absolute paths).
    assert run_record.file_record(bundled.NETWORK)['path'] == 'bundled/edm-digits-16x16.pkl'
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'net.pkl').write_bytes(b'x')
    assert run_record.file_record('net.pkl') == dict(path='net.pkl', sha256=run_record.sha256('net.pkl')) # Elsewhere: as given.
    assert run_record.file_record(str(tmp_path / 'net.pkl'))['path'] == str(tmp_path / 'net.pkl')
    assert run_record.file_record('https://example.org/a.pkl') == dict(path='https://example.org/a.pkl', sha256=None)

def test_time_shift_with_its_defaults_runs_on_the_bundled_network(tmp_path):
    result = invoke_ok(generate.main, [f'--outdir={tmp_path / "out"}', '--seeds=0-1', '--steps=6', '--do_time_shift', '--device=cpu'])
    assert 'the paper rule' in result.output # EDM's Heun sampler on an EDM network: the released rule does not apply.
    settings = json.loads((tmp_path / 'out-settings.json').read_text())
    assert settings['time_shift'] == dict(rule='paper', cutoff=300, window=80)

@pytest.mark.slow
def test_a_one_round_calibration_that_cannot_converge_is_reported_as_not_converged(tmp_path):
    # Bundled model, Euler 13: the first secant step from 1 overshoots to about 0.97 (h about -0.07).
    result = invoke_ok(eps_norm.main, [f'--outdir={tmp_path}', '--num=16', '--steps=13', '--solver=euler', '--calibrate', '--rounds=1', '--device=cpu'])
    assert 'calibration did NOT converge' in result.output
    calibration = json.loads((tmp_path / 'eps_norm.json').read_text())['calibration']
    assert calibration['converged'] is False and abs(calibration['residual']) > calibration['tolerance']
    assert json.loads((tmp_path / 'settings.json').read_text())['calibration']['converged'] is False

def test_outdir_inside_a_package_folder_is_refused(tmp_path):
    for command, args in [(generate.main, ['--seeds=0']), (eps_norm.main, [])]:
        result = CliRunner().invoke(command, [f'--outdir={os.path.join(REPO, "training", "out")}', *args])
        assert result.exit_code != 0 and 'inside the package folder training/' in result.output.strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(REPO, 'training', 'out'))

#----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_study_in_a_fresh_copy_leaves_git_status_clean(tmp_path, tiny_study_inputs): # noqa: F811
    copy = tmp_path / 'clone'
    tracked = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True).stdout.split('\n')
    for name in filter(None, tracked):
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(copy / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), copy / name)
    git = lambda *args: subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=copy, capture_output=True, text=True, check=True).stdout
    git('init', '-q')
    git('add', '-A')
    git('commit', '-qm', 'fresh copy')
    study = [sys.executable, 'study.py', *tiny_study_inputs, '--num=16', '--num_calibration=8', '--rounds=1', '--eps_scalers=1', '--batch=16']
    first = run_cli(study, cwd=copy, timeout=1200)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = os.listdir(copy / 'study-runs')
    assert len(runs) == 1 and runs[0].startswith('00000-') and 'Writing a new study' in first.stdout
    assert git('status', '--porcelain') == ''

    # The same folder again: kept, and said so; other settings or a broken study.json: one line, unless --restart.
    outdir = f'--outdir=study-runs/{runs[0]}'
    again = run_cli([*study, outdir], cwd=copy)
    assert again.returncode == 0 and 'Resuming the study' in again.stdout and 'entries kept' in again.stdout
    other = run_cli([*study, outdir, '--cutoff=200'], cwd=copy)
    assert other.returncode != 0 and 'other settings (cutoff differ)' in other.stderr.strip().splitlines()[-1]
    (copy / 'study-runs' / runs[0] / 'study.json').write_text('{broken')
    broken = run_cli([*study, outdir], cwd=copy)
    assert broken.returncode != 0 and 'study.json is not a readable study' in broken.stderr.strip().splitlines()[-1]

#----------------------------------------------------------------------------

def test_discriminator_training_on_unequal_counts_warns_and_reports_balanced_accuracy(tmp_path):
    import train_discriminator
    from tests.test_guidance import save_pair
    from tests.tiny_models import random_images, write_image_folder
    cls_path, _ = save_pair(tmp_path)
    real = write_image_folder(tmp_path / 'real', random_images(24, resolution=8, seed=1))
    fake = write_image_folder(tmp_path / 'fake', random_images(8, resolution=8, seed=2))
    result = invoke_ok(train_discriminator.main, [f'--real={real}', f'--fake={fake}', f'--pretrained_classifier_ckpt={cls_path}', '--epochs=1',
        '--batch=8', f'--outdir={tmp_path / "disc"}', '--width=16', '--depth=1', '--device=cpu'])
    assert 'Warning: 24 real vs 8 generated images' in result.output and 'balanced accuracy' in result.output

def test_small_messages_say_what_they_mean():
    from training.evaluation import feature_detectors
    from training import training_loop
    with pytest.raises(feature_detectors.DetectorError, match='^SSCD model file not found'):
        feature_detectors.load_torch_module('/nowhere/sscd.pt', what='SSCD model')
    assert '--ref' not in CliRunner().invoke(fid.main, ['ref', '--help']).output
    saved = dict(batch_size=16, network_kwargs=dict(model_channels=16, channel_mult=[1, 2], dropout=0.1))
    current = dict(batch_size=16, network_kwargs=dict(model_channels=32, channel_mult=[1, 2], dropout=0.1))
    assert training_loop.fingerprint_differences(saved, current) == ['network_kwargs.model_channels: 16 in the state, 32 now']
    assert training_loop.snapshot_name('network-snapshot', 2000, 1000, '.pkl') == 'network-snapshot-000002.pkl' # EDM's name...
    assert training_loop.snapshot_name('network-snapshot', 2500, 1000, '.pkl') == 'network-snapshot-000002.pkl'
    assert training_loop.snapshot_name('network-snapshot', 2500, 500, '.pkl') == 'network-snapshot-000002.500.pkl' # ...unless it would repeat.

def test_cli_defaults_write_outside_the_source_tree(tmp_path):
    import jacobian
    import study
    import trainMoLRG
    assert [p.default for p in jacobian.main.params if p.name == 'outdir'] == ['out-jacobian']
    assert [p.default for p in trainMoLRG.main.params if p.name == 'outdir'] == ['training-runs']
    (outdir,) = [p for p in study.main.params if p.name == 'outdir']
    assert not outdir.required and not isinstance(outdir.default, str) # No fixed folder: a new study-runs/NNNNN-<network>.
    assert study.new_run_folder(str(tmp_path), bundled.NETWORK) == os.path.join(str(tmp_path), '00000-edm-digits-16x16')
    os.makedirs(tmp_path / '00007-other')
    assert study.new_run_folder(str(tmp_path), 'a/b/net.pkl') == os.path.join(str(tmp_path), '00008-net')
    run_files = ['out/000000.png', 'out-grid.png', 'out-settings.json', 'out-jacobian/settings.json', 'training-runs/00000-x/log.txt',
        'study-runs/00000-x/study.json']
    ignored = subprocess.run(['git', 'check-ignore', *run_files], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ignored == run_files

"""The exposure-bias study (study.py) end to end on a tiny network, data, detector and reference."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import study
from tests.test_exposure_bias_samplers import write_tiny_dataset
from tests.tiny_models import TinyInception, save_torchscript
from training.studies import exposure_bias_study
from training.evaluation import frechet

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_study_inputs(tmp_path_factory, cond_net_pkl):
    tmp_path = tmp_path_factory.mktemp('study-inputs')
    data = write_tiny_dataset(tmp_path / 'data')
    save_torchscript(TinyInception(feature_dim=6), tmp_path / 'detector.pt') # Its name is recorded in the reference file below.
    ref = tmp_path / 'ref.npz'
    features = torch.randn([64, 6], generator=torch.Generator().manual_seed(0)) * 0.3
    moments = frechet.FeatureMoments(6)
    moments.add(features)
    frechet.save_stats(str(ref), *moments.stats(), detector='detector.pt')
    return [f'--network={cond_net_pkl}', f'--data={data}', f'--ref={ref}', f'--detector={tmp_path / "detector.pt"}', '--device=cpu']

def run_study(inputs, outdir, *extra):
    return CliRunner().invoke(study.main, [*inputs, f'--outdir={outdir}', '--num=16', '--num_calibration=8', '--rounds=1',
        '--eps_scalers=1,1.05', '--batch=16', *extra])

@pytest.fixture(scope='module')
def finished_study(tmp_path_factory, tiny_study_inputs):
    outdir = tmp_path_factory.mktemp('study') / 'out'
    result = run_study(tiny_study_inputs, outdir)
    assert result.exit_code == 0, result.output
    return outdir, result.output

@pytest.mark.slow
def test_study_writes_curves_calibration_and_a_complete_fd_table(finished_study):
    outdir, output = finished_study
    assert 'detector.pt' in output # The detector passed, checked against the name the reference records.
    results = json.loads((outdir / 'study.json').read_text())

    # Calibration per sampler: a positive scaler, and the fitted constant is the closed form of the measured curves.
    for name in ['euler-13', 'heun-18']:
        curves = json.loads((outdir / f'eps_norm_{name}.json').read_text())
        assert len(curves['eps_norm_consecutive']) == exposure_bias_study.SAMPLER_SETTINGS[name]['num_steps']
        assert results['calibration'][name]['eps_scaler'] > 0
        assert PIL.Image.open(outdir / f'eps_norm_{name}.png').size[0] > 500

    # Every (sampler, time shift, scaler) once, the calibrated scaler included, each a finite FD.
    fd = results['fd']
    keys = {(e['setting'], e['time_shift'], e['eps_scaler']) for e in fd}
    assert len(keys) == len(fd)
    for name in ['euler-13', 'heun-18']:
        calibrated = round(results['calibration'][name]['eps_scaler'], 5)
        for time_shift in (False, True):
            assert {1.0, 1.05, calibrated} <= {s for n, ts, s in keys if n == name and ts == time_shift}
    assert all(np.isfinite(e['fd']) and e['fd'] >= 0 for e in fd)

    # Each FD has its interval; each setting but the plain sampler its paired difference to the plain one.
    assert all(e['ci'][0] <= e['fd'] <= e['ci'][1] and e['ci'][0] < e['ci'][1] for e in fd)
    plain = {e['setting']: e for e in fd if e['eps_scaler'] == 1.0 and not e['time_shift']}
    assert sorted(plain) == ['euler-13', 'heun-18'] and not any('vs_plain' in e for e in plain.values())
    for e in fd:
        if e not in plain.values():
            c = e['vs_plain']
            assert c['paired'] and c['difference'] == pytest.approx(e['fd'] - plain[e['setting']]['fd'], abs=1e-9)
            assert c['ci'][0] <= c['difference'] <= c['ci'][1] and c['excludes_zero'] == (c['ci'][0] > 0 or c['ci'][1] < 0)
        assert (outdir / 'features' / f'{e["setting"]}{"-time-shift" if e["time_shift"] else ""}-eps{e["eps_scaler"]:.5f}.npz').is_file()
    assert not results['yardsticks']['plain_other_seeds']['vs_plain']['paired']
    assert {e['nfe'] for e in fd} == {13, 35}
    assert np.isfinite(results['yardsticks']['plain_other_seeds']['fd']) and np.isfinite(results['yardsticks']['training_images']['fd'])

    # The table files say the same as study.json.
    rows = (outdir / 'fd_table.csv').read_text().strip().splitlines()
    assert len(rows) == len(fd) + 1
    assert len(rows[0].split(',')) == 12 and all(len(row.split(',')) == 12 for row in rows)
    summary = (outdir / 'summary.md').read_text()
    assert f'{fd[0]["fd"]:.3f}' in summary and 'heun-18 + time shift' in summary
    assert f'[{fd[0]["ci"][0]:.3f}, {fd[0]["ci"][1]:.3f}]' in summary
    # The conclusions name every compared setting once: better, worse, or not shown to differ.
    conclusions = summary.split('Conclusions (from the paired 95% intervals only):')[1]
    compared = [e for e in fd if 'vs_plain' in e]
    shown = [e for e in compared if e['vs_plain']['excludes_zero']]
    assert conclusions.count('eps_scaler') == len(shown)
    assert (f'For the other {len(compared) - len(shown)} of {len(compared)} settings the paired interval includes 0' in conclusions) == (len(shown) < len(compared))
    assert PIL.Image.open(outdir / 'fd.png').size[0] > 400

@pytest.mark.slow
def test_a_rerun_keeps_finished_entries(tmp_path, tiny_study_inputs, finished_study):
    outdir = tmp_path / 'study'
    shutil.copytree(finished_study[0], outdir)
    results = json.loads((outdir / 'study.json').read_text())
    complete = len(results['fd'])
    results['fd'] = results['fd'][:3] # As if killed after three entries...
    results['fd'][0]['fd'] = -1.0     # ...with a marker that a recomputation would overwrite.
    (outdir / 'study.json').write_text(json.dumps(results))
    assert run_study(tiny_study_inputs, outdir).exit_code == 0
    again = json.loads((outdir / 'study.json').read_text())
    assert again['fd'][0]['fd'] == -1.0
    assert len(again['fd']) == complete

def test_bad_study_input_gets_one_line(tmp_path, tiny_study_inputs):
    result = run_study(tiny_study_inputs, tmp_path / 'study', '--eps_scalers=1,-2')
    assert result.exit_code != 0 and 'positive eps_scaler' in result.output
    result = run_study([*tiny_study_inputs, f'--ref={tmp_path / "missing.npz"}'], tmp_path / 'study')
    assert result.exit_code != 0 and result.output.strip().splitlines()[-1].startswith('Error: Reference statistics not found')
    assert not (tmp_path / 'study').exists()

#----------------------------------------------------------------------------

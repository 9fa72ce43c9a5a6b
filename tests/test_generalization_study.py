"""The memorization-to-generalization study (generalization_study.py): end to end in --quick mode on
tiny networks, its scores on the optimal denoiser, resuming, the copy threshold, and bad input."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generalization_study
from training import bundled
from training.evaluation import feature_detectors
from training.studies import generalization_study as study_lib
from training.sampling import optimal_denoiser as optimal_denoiser_lib

#----------------------------------------------------------------------------

QUICK = ['--quick', '--kimg=0.1', '--steps=4'] # --quick's sizes (8, 32) and widths (4, 8), trained and sampled even shorter.

def run(outdir, *args):
    return CliRunner().invoke(generalization_study.main, [f'--outdir={outdir}', *args])

@pytest.fixture(scope='module')
def quick_study(tmp_path_factory):
    outdir = tmp_path_factory.mktemp('generalization') / 'out'
    result = run(outdir, *QUICK)
    assert result.exit_code == 0, result.output
    return outdir

@pytest.mark.slow
def test_quick_study_trains_every_model_and_writes_the_complete_table(quick_study):
    outdir = quick_study
    lines = (outdir / 'table.csv').read_text().splitlines()
    header = lines[0].split(',')
    assert header == ['size', 'width', 'threshold', 'm_score', 'copy_fraction', 'rp_optimal', 'rp_other_width', 'train_seconds']
    rows = [dict(zip(header, line.split(','))) for line in lines[1:]]
    assert sorted((int(r['size']), int(r['width'])) for r in rows) == [(8, 4), (8, 8), (32, 4), (32, 8)]
    for r in rows:
        assert all(r[c] != '' for c in header), r # Every score of every model, the RP between widths included.
        assert 0 <= float(r['m_score']) <= 1 and abs(float(r['m_score']) + float(r['copy_fraction']) - 1) < 1e-9
        assert 0 <= float(r['rp_optimal']) <= 1 and 0 <= float(r['rp_other_width']) <= 1
        assert 0.5 < float(r['threshold']) < 1

    results = json.loads((outdir / 'study.json').read_text())
    for size in (8, 32):
        assert results['subsets'][str(size)]['optimal']['m_score'] == 0 # The optimal denoiser only ever returns training images.
        for width in (4, 8):
            run_dir = outdir / 'models' / study_lib.model_name(size, width)
            assert (run_dir / 'FINISHED').is_file() and (run_dir / 'train.log').is_file()
            assert 'kimg' in (run_dir / 'train.log').read_text()
    # Jacobian ranks at each step for the widest model of the smallest and largest subset, and their optimal denoisers.
    assert sorted(results['jacobian']) == ['n00008-c8', 'n00032-c8', 'optimal-n00008', 'optimal-n00032']
    for entry in results['jacobian'].values():
        assert len(entry['steps']) == 4 and all(0 <= s['rank'] <= 256 for s in entry['steps'])
    for size in ('8', '32'): # Both descriptors checked on each subset; pixels flag every noisy copy of a training digit.
        assert set(results['descriptors'][size]) == {'pixels', 'bundled_detector'}
        assert results['descriptors'][size]['pixels']['noisy_copies_flagged'] == 1
    for name in ['summary.md', 'scores.png', 'jacobian.png']:
        assert (outdir / name).stat().st_size > 0
    with np.load(outdir / 'images' / 'n00008-c4.npz') as npz:
        assert npz['samples'].shape == (32, 1, 16, 16) and list(npz['seeds']) == list(range(32))

@pytest.mark.slow
def test_rerun_keeps_finished_models_and_measurements(quick_study):
    outdir = quick_study
    watched = [outdir / 'models' / study_lib.model_name(s, w) / 'FINISHED' for s in (8, 32) for w in (4, 8)] + [outdir / 'images' / 'n00032-c8.npz']
    before = [os.stat(p).st_mtime_ns for p in watched]
    results_before = json.loads((outdir / 'study.json').read_text())
    result = run(outdir, *QUICK)
    assert result.exit_code == 0, result.output
    assert [os.stat(p).st_mtime_ns for p in watched] == before # Nothing retrained, nothing sampled again.
    assert json.loads((outdir / 'study.json').read_text()) == results_before

@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_in_one_line(quick_study):
    result = run(quick_study, *QUICK, '--lr=1e-3')
    assert result.exit_code != 0
    assert 'other settings' in result.output and 'lr 0.002 -> 0.001' in result.output
    assert len(result.output.strip().splitlines()) == 1

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits():
    images, _names = study_lib.load_images(bundled.DATA)
    subsets, held_out = study_lib.nested_split(len(images), [16, 64], split_seed=0)
    return images, subsets, held_out

def test_a_model_that_is_the_optimal_denoiser_scores_rp_1_against_it_and_m_0(digits):
    images, subsets, held_out = digits
    training = images[subsets[16]]
    threshold = study_lib.calibrate_threshold(study_lib.pixel_descriptors(training), study_lib.pixel_descriptors(images[held_out]))
    seeds = list(range(16))
    reference = study_lib.generate_samples(optimal_denoiser_lib.OptimalDenoiser(torch.as_tensor(training)), seeds, num_steps=8)
    model = study_lib.generate_samples(optimal_denoiser_lib.OptimalDenoiser(torch.as_tensor(training.copy())), seeds, num_steps=8)
    assert study_lib.rp_score(model, reference, threshold) == 1
    assert study_lib.memorization_scores(model, training, threshold) == dict(m_score=0, copy_fraction=1) # M = 0: all copies.
    # The same samples against other digits: not copies of them.
    assert study_lib.memorization_scores(model, images[held_out[:64]], threshold)['m_score'] > 0.5

def smooth_images(num, seed):
    """Distinct smooth 16x16 patterns (bilinear 4x4 noise), each of pixel mean 128 and std 50."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.randn([num, 1, 4, 4], generator=gen, dtype=torch.float64), size=16, mode='bilinear', align_corners=True)
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)
    return (128 + 50 * x).round().clip(0, 255).to(torch.uint8).numpy()

def test_calibrated_threshold_separates_exact_copies_from_noisier_variants():
    training = smooth_images(12, seed=0)
    held_out = study_lib.noisy_copies(training, std=20, seed=1) # "Unseen" images: as close to training images as real ones may be.
    train_d = study_lib.pixel_descriptors(training)
    threshold = study_lib.calibrate_threshold(train_d, study_lib.pixel_descriptors(held_out))
    assert threshold == pytest.approx(float(study_lib.nearest_similarity(study_lib.pixel_descriptors(held_out), train_d).max()))
    assert study_lib.memorization_scores(held_out, training, threshold)['copy_fraction'] == 0 # No held-out image counts as a copy.
    assert study_lib.memorization_scores(training, training, threshold)['copy_fraction'] == 1 # Exact copies all do,
    assert study_lib.memorization_scores(study_lib.noisy_copies(training, std=5, seed=2), training, threshold)['copy_fraction'] == 1 # and slightly noisy ones,
    assert study_lib.memorization_scores(study_lib.noisy_copies(training, std=40, seed=3), training, threshold)['copy_fraction'] == 0 # but not noisier variants.

def test_pixel_descriptor_flags_noisy_copies_of_training_digits_above_every_held_out_digit(digits):
    images, subsets, held_out = digits
    check = study_lib.descriptor_check(study_lib.pixel_descriptors, images[subsets[64]], images[held_out])
    assert check['noisy_copies_flagged'] == 1 and check['margin'] > 0
    assert 0.9 < check['threshold'] < 0.999

def test_pixels_separate_noisy_copies_more_clearly_than_the_bundled_detector(digits):
    images, subsets, held_out = digits
    detector = feature_detectors.load_feature_detector(bundled.DETECTOR, [1, 16, 16], verbose=False)
    describe = lambda x: detector(torch.as_tensor(x)).to(torch.float64)
    pixels = study_lib.descriptor_check(study_lib.pixel_descriptors, images[subsets[64]], images[held_out])
    features = study_lib.descriptor_check(describe, images[subsets[64]], images[held_out])
    assert pixels['relative_margin'] > 5 * features['relative_margin'] # The detector sees one '3' much like another.

#----------------------------------------------------------------------------

@pytest.mark.parametrize('args, message', [
    (['--sizes=8,5000'], 'leaves no held-out image'),
    (['--sizes=0,8'], 'positive integer'),
    (['--widths=a'], 'not a comma-separated list'),
    (['--data=does-not-exist.zip'], 'does-not-exist.zip'),
    (['--sscd=missing-sscd.pt'], 'missing-sscd.pt'),
])
def test_bad_input_gets_one_line_and_trains_nothing(tmp_path, args, message):
    result = run(tmp_path / 'out', '--quick', *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert 'Traceback' not in result.output
    assert not (tmp_path / 'out' / 'models').exists()

def test_corrupt_study_json_gets_one_line(tmp_path):
    (tmp_path / 'study.json').write_text('{"config": ')
    result = run(tmp_path, '--quick')
    assert result.exit_code != 0 and 'study.json' in result.output and 'move it away' in result.output
    assert len(result.output.strip().splitlines()) == 1

#----------------------------------------------------------------------------

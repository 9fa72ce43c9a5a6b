"""training/evaluation/fid_uncertainty.py and fid.py features/calc --ci/compare: intervals that cover what they claim.

Statistics are checked on Gaussian features, whose population Frechet distance to a fixed
reference is known in closed form.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import fid
from tiny_models import TinyInception, random_images, save_torchscript, write_image_folder
from training.evaluation import fid_uncertainty as fu
from training.evaluation import frechet

#----------------------------------------------------------------------------

DIM = 4
REF_MU = np.array([0.3, -0.2, 0.1, 0.0])
REF_SIGMA = np.diag([1.0, 0.8, 0.6, 0.5]) + 0.1
GEN_MU = np.zeros(DIM)
GEN_SIGMA = np.diag([1.3, 0.5, 0.9, 0.4]) + 0.05
POPULATION_FD = frechet.frechet_distance(GEN_MU, GEN_SIGMA, REF_MU, REF_SIGMA)

def gaussian_set(rng, num, shift=0.0):
    features = rng.multivariate_normal(GEN_MU + shift, GEN_SIGMA, size=num)
    return fu.FeatureSet(features, seeds=np.arange(num))

@pytest.fixture(scope='module', params=['exact', 'expansion'])
def repeated_draws(request):
    """200 draws of N = 1000 images, each with its FID interval and FID-infinity interval, by either route."""
    rng = np.random.default_rng(0)
    ref = fu.ReferenceRoot(REF_MU, REF_SIGMA)
    return [fu.fid_with_interval(gaussian_set(rng, 1000), ref, num_blocks=50, num_resamples=200, seed=k, method=request.param) for k in range(200)]

@pytest.mark.slow
def test_the_fid_interval_covers_the_expected_fid_of_n_images_in_90_to_99_percent(repeated_draws):
    expected_fid_n = np.mean([r['fid'] for r in repeated_draws])
    coverage = np.mean([r['ci'][0] <= expected_fid_n <= r['ci'][1] for r in repeated_draws])
    print(f'{repeated_draws[0]["method"]}: FID interval covers E[FID_N] in {coverage:.1%} of 200 draws')
    assert 0.90 <= coverage <= 0.99

@pytest.mark.slow # Both tests on the 200 repeated draws; the fixture is the slow part.
def test_fid_infinity_covers_the_population_fd_about_as_often_and_removes_the_finite_n_bias(repeated_draws):
    fid_n = np.array([r['fid'] for r in repeated_draws])
    fid_inf = np.array([r['fid_inf'] for r in repeated_draws])
    bias = fid_n.mean() - POPULATION_FD
    # FID_N is biased upward (here by about 0.01 = 2% at N = 1000 and D = 4; the bias grows like D / N).
    assert bias > 0 and bias > 3 * fid_n.std() / np.sqrt(len(fid_n))
    assert abs(fid_inf.mean() - POPULATION_FD) < abs(bias)
    coverage = np.mean([r['fid_inf_ci'][0] <= POPULATION_FD <= r['fid_inf_ci'][1] for r in repeated_draws])
    naive = np.mean([r['ci'][0] <= POPULATION_FD <= r['ci'][1] for r in repeated_draws])
    print(f'FID-inf covers the population FD {POPULATION_FD:.4f} in {coverage:.1%}; FID_N bias {bias:+.4f} ({bias / POPULATION_FD:.1%}); '
        f'the FID interval covers the population in {naive:.1%}')
    assert 0.88 <= coverage <= 0.995

def test_fid_infinity_of_gaussian_features_recovers_the_population_fd_within_its_interval():
    result = fu.fid_with_interval(gaussian_set(np.random.default_rng(7), 5000), fu.ReferenceRoot(REF_MU, REF_SIGMA))
    assert result['fid_inf_ci'][0] <= POPULATION_FD <= result['fid_inf_ci'][1]
    assert result['fid_inf_sizes'] == [1000, 2000, 3000, 4000, 5000]

def test_the_point_estimate_is_the_fid_of_all_images():
    feature_set = gaussian_set(np.random.default_rng(1), 500)
    expected = frechet.frechet_distance(feature_set.features.astype(np.float64).mean(0), np.cov(feature_set.features.astype(np.float64), rowvar=False), REF_MU, REF_SIGMA)
    for method in ('exact', 'expansion'):
        assert fu.fid_with_interval(feature_set, fu.ReferenceRoot(REF_MU, REF_SIGMA), num_blocks=20, method=method)['fid'] == pytest.approx(expected, rel=1e-9)

def test_second_order_expansion_and_exact_intervals_agree_within_a_few_percent_of_their_width():
    rng = np.random.default_rng(3)
    dim = 32
    mixing = rng.standard_normal([dim, dim]) / np.sqrt(dim)
    ref = fu.ReferenceRoot(np.zeros(dim), mixing.T @ mixing * 1.2)
    features = rng.standard_normal([4000, dim]) @ mixing + 0.05
    set_a, set_b = fu.FeatureSet(features, np.arange(4000)), fu.FeatureSet(features * 1.02, np.arange(4000))
    exact = fu.paired_comparison(set_a, set_b, ref, method='exact')
    linear = fu.paired_comparison(set_a, set_b, ref, method='expansion')
    width = exact['ci'][1] - exact['ci'][0]
    assert exact['difference'] == pytest.approx(linear['difference'], rel=1e-9)
    assert np.allclose(exact['ci'], linear['ci'], atol=0.05 * width)
    width_a = exact['ci_a'][1] - exact['ci_a'][0]
    assert np.allclose(exact['ci_a'], linear['ci_a'], atol=0.05 * width_a)

#----------------------------------------------------------------------------
# Paired comparisons.

def test_the_paired_interval_of_two_identical_sets_is_exactly_zero():
    feature_set = gaussian_set(np.random.default_rng(2), 800)
    for method in ('exact', 'expansion'):
        result = fu.paired_comparison(feature_set, fu.FeatureSet(feature_set.features.copy(), feature_set.seeds.copy()), fu.ReferenceRoot(REF_MU, REF_SIGMA), method=method)
        assert result['difference'] == 0 and result['ci'] == [0.0, 0.0] and not result['excludes_zero']

def test_pairing_is_by_seed_not_by_row_order():
    feature_set = gaussian_set(np.random.default_rng(2), 800)
    order = np.random.default_rng(5).permutation(800)
    shuffled = fu.FeatureSet(feature_set.features[order], feature_set.seeds[order])
    assert fu.paired_comparison(feature_set, shuffled, fu.ReferenceRoot(REF_MU, REF_SIGMA))['ci'] == [0.0, 0.0]

def test_a_known_shift_is_detected_and_pairing_narrows_the_interval():
    rng = np.random.default_rng(4)
    ref = fu.ReferenceRoot(REF_MU, REF_SIGMA)
    set_a = gaussian_set(rng, 2000)
    set_b = fu.FeatureSet(set_a.features + np.array([-0.05, 0, 0, 0]), set_a.seeds) # Away from REF_MU[0] = 0.3: worse by about 0.03.
    paired = fu.paired_comparison(set_a, set_b, ref)
    assert paired['difference'] > 0 and paired['ci'][0] > 0 and paired['excludes_zero'] and paired['b_better_fraction'] == 0
    backwards = fu.paired_comparison(set_b, set_a, ref)
    assert backwards['ci'][1] < 0 and backwards['b_better_fraction'] == 1
    unpaired = fu.paired_comparison(set_a, set_b, ref, unpaired=True)
    assert unpaired['difference'] == paired['difference'] and not unpaired['paired']
    assert unpaired['ci'][1] - unpaired['ci'][0] > 3 * (paired['ci'][1] - paired['ci'][0])
    assert 'UNPAIRED' in fu.comparison_line(unpaired) and 'paired over 2000 common seeds' in fu.comparison_line(paired)

#----------------------------------------------------------------------------
# Bad input, one line each.

def test_bad_input_gets_one_line():
    ref = fu.ReferenceRoot(REF_MU, REF_SIGMA)
    few = gaussian_set(np.random.default_rng(0), 150)
    with pytest.raises(fu.UncertaintyError, match='fewer than 2 images per block; use more images or fewer blocks'):
        fu.fid_with_interval(few, ref, num_blocks=100)
    with pytest.raises(fu.UncertaintyError, match='3-dimensional features, but the reference statistics are 4-dimensional'):
        fu.fid_with_interval(fu.FeatureSet(np.zeros([400, 3])), ref)
    with pytest.raises(fu.UncertaintyError, match='4-dimensional features but features 5-dimensional'):
        fu.paired_comparison(few, fu.FeatureSet(np.zeros([150, 5]), np.arange(150)), ref)
    with pytest.raises(fu.UncertaintyError, match='B 150, 0 in common: a paired comparison needs the same seeds'):
        fu.paired_comparison(few, fu.FeatureSet(few.features, np.arange(150) + 1000), ref, num_blocks=10)
    with pytest.raises(fu.UncertaintyError, match='has no seeds'):
        fu.paired_comparison(few, fu.FeatureSet(few.features), ref, num_blocks=10)
    with pytest.raises(fu.UncertaintyError, match='the same seed appears more than once'):
        fu.FeatureSet(np.zeros([3, 4]), [1, 1, 2])

#----------------------------------------------------------------------------
# fid.py features, calc --ci, compare.

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('fidci')
    detector = save_torchscript(TinyInception(feature_dim=8), root / 'detector.pt')
    data, generated = random_images(200, seed=1), random_images(200, seed=2)
    ref = root / 'ref.npz'
    run_ok('ref', '--data', write_image_folder(root / 'data', data), '--dest', ref, '--detector', detector, '--workers=0')
    return dict(root=root, detector=detector, ref=ref, generated=write_image_folder(root / 'generated', generated, subdirs=True),
        same=write_image_folder(root / 'same', generated), other=write_image_folder(root / 'other', random_images(200, seed=3)))

def run_ok(*args):
    result = CliRunner().invoke(fid.main, [str(arg) for arg in args] + ['--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def test_features_carry_their_seeds_and_calc_ci_gives_a_quotable_line_and_json(files):
    dest = files['root'] / 'gen.npz'
    run_ok('features', '--images', files['generated'], '--dest', dest, '--detector', files['detector'], '--workers=0', '--batch=32')
    saved = fu.load_features(dest)
    assert saved.features.shape == (200, 8) and np.array_equal(saved.seeds, np.arange(200))

    plain = float(run_ok('calc', '--images', files['generated'], '--ref', files['ref'], '--detector', files['detector'], '--num=200', '--workers=0').stdout.strip().splitlines()[-1])
    out = files['root'] / 'fid.json'
    result = run_ok('calc', '--images', files['generated'], '--ref', files['ref'], '--detector', files['detector'], '--num=200', '--workers=0', '--ci', f'--json={out}', '--blocks=20')
    line = [l for l in result.stdout.splitlines() if l.startswith('FID ')][0]
    assert '95% CI' in line and 'FID-infinity' in line and '20 seed blocks' in line
    record = json.loads(out.read_text())
    assert record['fid'] == pytest.approx(plain, rel=1e-6) and record['ci'][0] < record['fid'] < record['ci'][1]
    again = run_ok('calc', '--images', dest, '--ref', files['ref'], '--num=200', '--ci', '--blocks=20') # From the features file: no detector.
    assert [l for l in again.stdout.splitlines() if l.startswith('FID ')][0] == line

def test_compare_pairs_by_seed_and_refuses_unpaired_sets_in_one_line(files):
    common = ['--ref', files['ref'], '--detector', files['detector'], '--workers=0', '--blocks=20']
    same = run_ok('compare', '--a', files['generated'], '--b', files['same'], *common)
    assert '+0.000 (95% CI +0.000 to +0.000; paired over 200 common seeds' in same.stdout
    other = run_ok('compare', '--a', files['generated'], '--b', files['other'], *common)
    assert 'paired over 200 common seeds' in other.stdout

    unpaired = files['root'] / 'unpaired.npz' # Features of other seeds.
    fu.save_features(unpaired, fu.FeatureSet(np.random.default_rng(0).standard_normal([200, 8]), np.arange(200) + 5000))
    result = CliRunner().invoke(fid.main, ['compare', '--a', files['generated'], '--b', str(unpaired), *map(str, common), '--device=cpu'])
    assert result.exit_code != 0 and result.stderr.strip().splitlines()[-1].startswith('Error: A has 200 seeds and B 200, 0 in common')
    assert 'UNPAIRED' in run_ok('compare', '--a', files['generated'], '--b', unpaired, *common, '--unpaired').stdout

#----------------------------------------------------------------------------

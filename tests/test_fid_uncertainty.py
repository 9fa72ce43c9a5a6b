"""training/evaluation/fid_uncertainty.py and fid.py features/calc --ci --kid/compare: intervals and errors that cover what they claim.

Statistics are checked on Gaussian features, whose population Frechet distance to a fixed
reference is known in closed form.
"""

import json
import types

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

def test_where_fid_n_is_mostly_bias_the_fd_intervals_stop_at_zero_and_still_cover():
    # Heavy-tailed features (Student t, 5 degrees of freedom) from the reference's own distribution:
    # population FD 0, and 200 images in 8 dimensions, so FID_N is all bias. The resampled FDs are
    # skewed and the centred lower end falls below 0 in about 1 draw in 10 (the study's 400 real
    # digits, 64 dimensions: [-1.491, 15.425] around 5.383).
    rng = np.random.default_rng(0)
    ref = fu.ReferenceRoot(np.zeros(8), np.eye(8) * 5 / 3)
    draws = [fu.fid_with_interval(fu.FeatureSet(rng.standard_normal([200, 8]) / np.sqrt(rng.chisquare(5, size=[200, 1]) / 5)), ref,
        num_blocks=50, seed=k) for k in range(200)]
    expected_fid_n = np.mean([r['fid'] for r in draws])
    coverage = np.mean([r['ci'][0] <= expected_fid_n <= r['ci'][1] for r in draws])
    clipped = np.mean([r['ci_clipped'] for r in draws])
    print(f'population FD 0, E[FID_N] {expected_fid_n:.3f}: interval covers it in {coverage:.1%}, lower end clipped at 0 in {clipped:.1%}; '
        f'FID-infinity interval clipped in {np.mean([r["fid_inf_ci_clipped"] for r in draws]):.1%}')
    assert all(r['ci'][0] >= 0 and r['fid_inf_ci'][0] >= 0 for r in draws)
    assert 0.03 <= clipped <= 0.3 and 0.9 <= coverage <= 1
    assert any(r['fid_inf'] < 0 for r in draws) # FID-infinity itself is an extrapolation and may be negative; its interval is not.
    line = fu.fid_line(next(r for r in draws if r['ci_clipped']))
    assert 'CI 0.000, clipped at 0 to' in line
    assert fu.nonnegative_interval(1.0, [0.0, 5.0, 6.0, 7.0]) == ([0.0, pytest.approx(3.425)], True) # Centred: [-3.125, 3.425].

def test_fid_infinity_of_gaussian_features_recovers_the_population_fd_within_its_interval():
    result = fu.fid_with_interval(gaussian_set(np.random.default_rng(7), 5000), fu.ReferenceRoot(REF_MU, REF_SIGMA))
    assert result['fid_inf_ci'][0] <= POPULATION_FD <= result['fid_inf_ci'][1]
    assert result['fid_inf_sizes'] == [1000, 2000, 3000, 4000, 5000]

def test_the_point_estimate_is_the_fid_of_all_images():
    feature_set = gaussian_set(np.random.default_rng(1), 500)
    expected = frechet.frechet_distance(feature_set.features.astype(np.float64).mean(0), np.cov(feature_set.features.astype(np.float64), rowvar=False), REF_MU, REF_SIGMA)
    ref = fu.ReferenceRoot(REF_MU, REF_SIGMA)
    assert fu.fid_with_interval(feature_set, ref, num_blocks=20, method='exact')['fid'] == pytest.approx(expected, rel=1e-9) # float64 throughout.
    assert fu.fid_with_interval(feature_set, ref, num_blocks=20, method='expansion')['fid'] == pytest.approx(expected, rel=1e-7) # float32 products.

def float64_expansion(features, ref, num_blocks, weights):
    """FID and the expansion's resampled FIDs written out directly in float64 from the docstring's formula."""
    x = features.astype(np.float64)
    blocks = fu.block_index(len(x), num_blocks)
    mean, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    lam, vectors = np.linalg.eigh(ref.root @ sigma @ ref.root)
    transform, root = ref.root @ vectors, np.sqrt(lam)
    kernel = -0.5 / (root[:, None] * root[None, :] * (root[:, None] + root[None, :]))
    centred = [x[blocks == b] - mean for b in range(num_blocks)]
    counts = np.array([len(c) for c in centred])
    sums = np.stack([c.sum(axis=0) for c in centred])
    second = np.stack([c.T @ c for c in centred])
    fid = np.square(mean - ref.mu).sum() + np.trace(sigma) + ref.trace - 2 * root.sum()
    resampled = []
    for w in weights:
        n = w @ counts
        offset = w @ sums / n
        resampled_sigma = n / (n - 1) * (np.tensordot(w, second, axes=1) / n - np.outer(offset, offset))
        change = transform.T @ (resampled_sigma - sigma) @ transform
        without_mean = change + n / (n - 1) * np.outer(transform.T @ offset, transform.T @ offset) # The quadratic term leaves the mean's rank-one part out.
        sqrt_trace = root.sum() + (np.diagonal(change) / (2 * root)).sum() + 0.5 * (kernel * np.square(without_mean)).sum()
        resampled.append(np.square(mean + offset - ref.mu).sum() + np.trace(resampled_sigma) + ref.trace - 2 * sqrt_trace)
    return fid, np.array(resampled)

def test_float32_passes_give_the_float64_fid_and_resamples_of_the_expansion():
    rng = np.random.default_rng(8)
    dim, num, num_blocks = 300, 3000, 30
    rotation = lambda: np.linalg.qr(rng.standard_normal([dim, dim]))[0]
    mixing = rotation() * np.exp(rng.uniform(-2, 0.5, size=dim)) @ rotation() # Eigenvalues over a factor e^5, none near 0.
    ref = fu.ReferenceRoot(np.full(dim, 0.1), mixing.T @ mixing * 1.1 + 0.01 * np.eye(dim))
    features = (rng.standard_normal([num, dim]) @ mixing + 0.3).astype(np.float32)
    weights = fu.resample_weights(num_blocks, 50, seed=1)
    expected_fid, expected = float64_expansion(features, ref, num_blocks, weights)
    fd = fu.ResampledFrechet(fu.block_statistics(fu.FeatureSet(features), ref, num_blocks, 'expansion'), ref)
    resampled = fd(weights)[0]
    spread = expected.std()
    assert fd.fid == pytest.approx(expected_fid, rel=1e-8)
    # Every resample within 4e-6 of the bootstrap spread (measured 8e-7; the float32 rounding of the
    # rotated features); the previous implementation, float64 covariance and float32 block moments, 1.3e-6.
    assert np.abs(resampled - expected).max() < 4e-6 * spread
    assert np.allclose(fu.centered_interval(fd.fid, resampled), fu.centered_interval(expected_fid, expected), rtol=0, atol=4e-6 * spread)

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
    assert exact['difference'] == pytest.approx(linear['difference'], rel=1e-6) # float64 and float32 products.
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
    with pytest.raises(fu.UncertaintyError, match='over 8 GiB\\) at 2048 dimensions; use --blocks=1024 or fewer'):
        fu.block_statistics(fu.FeatureSet(np.zeros([4200, 2048])), types.SimpleNamespace(dim=2048), 2100, 'expansion') # Refused before any pass.
    with pytest.raises(fu.UncertaintyError, match='the same seed appears more than once'):
        fu.FeatureSet(np.zeros([3, 4]), [1, 1, 2])

#----------------------------------------------------------------------------
# KID.

KID_SIGMA = np.diag([1.0, 0.8, 0.6, 0.5, 1.2, 0.7, 0.9, 1.1]) + 0.1

def expected_kernel(mu1, sigma1, mu2, sigma2):
    """E (x.y/d + 1)^3 for independent x ~ N(mu1, sigma1), y ~ N(mu2, sigma2), from the moments of x.y: given x, x.y is
    N(m, v) with m = x.mu2, v = x^T sigma2 x, so E[(x.y)^3] = E[m^3 + 3 m v] (checked by Monte Carlo to 0.04%)."""
    d = len(mu1)
    a = mu1 @ mu2
    second = np.trace((sigma1 + np.outer(mu1, mu1)) @ (sigma2 + np.outer(mu2, mu2)))
    third = a ** 3 + 3 * a * (mu2 @ sigma1 @ mu2 + mu1 @ sigma2 @ mu1 + np.trace(sigma1 @ sigma2)) + 6 * mu1 @ sigma2 @ sigma1 @ mu2
    return 1 + 3 * a / d + 3 * second / d ** 2 + third / d ** 3

def population_kid(mu1, sigma1, mu2, sigma2):
    return expected_kernel(mu1, sigma1, mu1, sigma1) + expected_kernel(mu2, sigma2, mu2, sigma2) - 2 * expected_kernel(mu1, sigma1, mu2, sigma2)

def kid_draws(shift, num_draws=200, num=1000, subset_size=100, seed=0):
    rng = np.random.default_rng(seed)
    mean = np.zeros(8)
    return [fu.kid_with_error(fu.FeatureSet(rng.multivariate_normal(mean + shift, KID_SIGMA, size=num), np.arange(num)),
        rng.multivariate_normal(mean, KID_SIGMA, size=num), subset_size=subset_size) for _ in range(num_draws)]

def test_kid_is_the_unbiased_mmd2_of_a_direct_sum_over_pairs():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal([30, 5]), rng.standard_normal([25, 5]) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3
    within_x = sum(k(x[i], x[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    within_y = sum(k(y[i], y[j]) for i in range(25) for j in range(25) if i != j) / (25 * 24)
    across = sum(k(x[i], y[j]) for i in range(30) for j in range(25)) / (30 * 25)
    assert fu.unbiased_mmd2(x, y) == pytest.approx(within_x + within_y - 2 * across, rel=1e-12)
    result = fu.kid_with_error(fu.FeatureSet(np.concatenate([x[:25], x[:25]])), y, subset_size=25) # Two subsets, both x[:25] against all of y.
    assert result['kid'] == pytest.approx(fu.unbiased_mmd2(x[:25].astype(np.float32), y.astype(np.float32)), rel=1e-12) and result['kid_se'] < 1e-12

def test_kid_of_one_distribution_averages_to_zero_and_its_standard_error_is_the_spread_over_draws():
    draws = kid_draws(shift=0.0)
    kid, se = np.array([r['kid'] for r in draws]), np.array([r['kid_se'] for r in draws])
    print(f'same distribution: mean KID {kid.mean():+.2e} over 200 draws (std {kid.std():.2e}), RMS standard error {np.sqrt(np.mean(se ** 2)):.2e}; '
        f'{np.mean(kid < 0):.0%} negative')
    assert abs(kid.mean()) < 3 * kid.std() / np.sqrt(len(kid)) # Unbiased: no finite-N offset as FID has.
    assert 0.25 < np.mean(kid < 0) < 0.75
    assert 0.8 < np.sqrt(np.mean(se ** 2)) / kid.std() < 1.25 # The standard error says how far KID moves between draws.
    assert not draws[0]['reference_reused'] and draws[0]['kid_subsets'] == 10

def test_kid_of_a_mean_shift_matches_the_closed_form_and_is_detected_at_many_standard_errors():
    shift = np.array([0.4, 0, 0, 0, 0, 0, 0, 0])
    expected = population_kid(shift, KID_SIGMA, np.zeros(8), KID_SIGMA)
    draws = kid_draws(shift=shift, num_draws=100)
    kid = np.array([r['kid'] for r in draws])
    large = kid_draws(shift=shift, num_draws=1, num=10000, subset_size=1000)[0]
    print(f'shift 0.4: mean KID {kid.mean():.4e} over 100 draws, closed form {expected:.4e}; 10000 images: {large["kid"]:.4e} +- {large["kid_se"]:.1e}')
    assert abs(kid.mean() - expected) < 3 * kid.std() / np.sqrt(len(kid))
    assert large['kid'] > 10 * large['kid_se'] and abs(large['kid'] - expected) < 3 * large['kid_se']

def test_bad_kid_input_gets_one_line():
    rng = np.random.default_rng(0)
    images = fu.FeatureSet(rng.standard_normal([300, 4]))
    with pytest.raises(fu.UncertaintyError, match='300 images make fewer than the 2 disjoint KID subsets of 200 that a standard error needs; use more images or --kid_subset=150 at most'):
        fu.kid_with_error(images, rng.standard_normal([500, 4]), subset_size=200)
    with pytest.raises(fu.UncertaintyError, match='reference holds features of 50 images, fewer than the KID subset size 100; pass --kid_subset=50 or less'):
        fu.kid_with_error(images, rng.standard_normal([50, 4]), subset_size=100)
    with pytest.raises(fu.UncertaintyError, match='4-dimensional features, but the reference features have shape \\[500, 3\\]'):
        fu.kid_with_error(images, rng.standard_normal([500, 3]), subset_size=100)

#----------------------------------------------------------------------------
# fid.py features, calc --ci, compare.

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('fidci')
    detector = save_torchscript(TinyInception(feature_dim=8), root / 'detector.pt')
    data, generated = random_images(200, seed=1), random_images(200, seed=2)
    ref = root / 'ref.npz'
    run_ok('ref', '--data', write_image_folder(root / 'data', data), '--dest', ref, '--detector', detector, '--workers=0')
    return dict(root=root, detector=detector, ref=ref, data=root / 'data', generated=write_image_folder(root / 'generated', generated, subdirs=True),
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

def one_line_error(*args):
    result = CliRunner().invoke(fid.main, [str(arg) for arg in args] + ['--device=cpu'])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code not in (0, None) and 'Traceback' not in result.output and len(lines) == 1, result.output
    assert 'Calculating' not in result.output # Refused before any image went through the detector.
    return lines[0]

def test_ref_features_keep_the_statistics_and_give_calc_kid_a_quotable_line_and_json(files):
    with_features = files['root'] / 'ref-features.npz'
    run_ok('ref', '--data', files['data'], '--dest', with_features, '--detector', files['detector'], '--workers=0', '--features')
    with np.load(with_features, allow_pickle=False) as npz, np.load(files['ref'], allow_pickle=False) as plain:
        assert npz['features'].shape == (200, 8) and npz['features'].dtype == np.float32
        assert np.allclose(npz['mu'], plain['mu'], rtol=1e-12, atol=0) and np.allclose(npz['sigma'], plain['sigma'], rtol=1e-10, atol=1e-14)
        assert str(npz['detector']) == str(plain['detector']) and str(npz['detector_sha256']) == str(plain['detector_sha256'])
        ref_features = npz['features']
    features = files['root'] / 'kid-gen.npz'
    run_ok('features', '--images', files['generated'], '--dest', features, '--detector', files['detector'], '--workers=0')
    expected = fu.kid_with_error(fu.load_features(features), ref_features, subset_size=50)

    out = files['root'] / 'kid.json'
    result = run_ok('calc', '--images', files['generated'], '--ref', with_features, '--detector', files['detector'], '--num=200', '--workers=0',
        '--kid', '--kid_subset=50', f'--json={out}')
    line = [l for l in result.stdout.splitlines() if l.startswith('KID ')][0]
    assert 'over 4 disjoint subsets of 50 images against 200 reference features' in line and f'{expected["kid"]:.4e}' in line
    record = json.loads(out.read_text())
    assert record['kid'] == pytest.approx(expected['kid'], rel=1e-9) and record['kid_se'] == pytest.approx(expected['kid_se'], rel=1e-6)
    assert record['kid_subsets'] == 4 and record['fid'] == pytest.approx(float(result.stdout.strip().splitlines()[-1]), rel=1e-5)
    again = run_ok('calc', '--images', features, '--ref', with_features, '--num=200', '--kid', '--kid_subset=50') # From the features file.
    assert [l for l in again.stdout.splitlines() if l.startswith('KID ')][0] == line

def test_bad_kid_input_on_the_command_line_gets_one_line_before_any_work(files):
    common = ['--images', files['generated'], '--detector', files['detector'], '--num=200', '--workers=0', '--kid']
    line = one_line_error('calc', '--ref', files['ref'], *common, '--kid_subset=50')
    assert line.endswith('holds no per-image features, which KID needs; rebuild it with "fid.py ref --features"')
    with_features = files['root'] / 'ref-features-bad.npz'
    with np.load(files['ref'], allow_pickle=False) as npz:
        frechet.save_stats(with_features, npz['mu'], npz['sigma'], features=np.zeros([400, 8], dtype=np.float32))
    line = one_line_error('calc', '--ref', with_features, *common, '--kid_subset=150')
    assert f'{files["generated"]}: 200 images make fewer than the 2 disjoint KID subsets of 150 that a standard error needs; use more images or --kid_subset=100 at most' in line
    with np.load(files['ref'], allow_pickle=False) as npz:
        frechet.save_stats(with_features, npz['mu'], npz['sigma'], features=np.zeros([40, 8], dtype=np.float32))
    line = one_line_error('calc', '--ref', with_features, *common, '--kid_subset=50')
    assert 'The reference holds features of 40 images, fewer than the KID subset size 50; pass --kid_subset=40 or less' in line
    with np.load(files['ref'], allow_pickle=False) as npz:
        frechet.save_stats(with_features, npz['mu'], npz['sigma'], features=np.zeros([400, 5], dtype=np.float32))
    line = one_line_error('calc', '--ref', with_features, *common, '--kid_subset=50')
    assert 'holds 5-dimensional features but 8-dimensional statistics; rebuild it with "fid.py ref --features"' in line

#----------------------------------------------------------------------------

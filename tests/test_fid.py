"""fid.py and training/evaluation/frechet.py: the exact Frechet distance, feature statistics, inputs and errors."""

import hashlib
import os
import pickle
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import fid
from conftest import REPO, run_cli
from tiny_models import FixedSizeDetector, TinyInception, random_images, save_torchscript, write_image_folder
from torch_utils import persistence
from training.evaluation import frechet
from training import image_sources

#----------------------------------------------------------------------------
# The Frechet distance.

def textbook_frechet_distance(mu1, sigma1, mu2, sigma2):
    """Heusel et al.'s formula through scipy.linalg.sqrtm, as EDM computes it."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * root)))

def random_stats(rnd, dim, num):
    features = rnd.standard_normal([num, dim]) @ rnd.standard_normal([dim, dim]) * rnd.uniform(0.1, 3) + rnd.standard_normal(dim)
    return features.mean(axis=0), np.cov(features, rowvar=False), features

@pytest.mark.parametrize('dim', [2, 16, 64, 200])
def test_frechet_distance_agrees_with_the_sqrtm_formula(dim):
    rnd = np.random.default_rng(dim)
    for _trial in range(3):
        mu1, sigma1, _ = random_stats(rnd, dim, 3 * dim + 5)
        mu2, sigma2, _ = random_stats(rnd, dim, 3 * dim + 5)
        expected = textbook_frechet_distance(mu1, sigma1, mu2, sigma2)
        assert frechet.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)

def test_frechet_distance_of_identical_statistics_is_zero_and_symmetric_otherwise():
    rnd = np.random.default_rng(0)
    mu1, sigma1, _ = random_stats(rnd, 32, 100)
    mu2, sigma2, _ = random_stats(rnd, 32, 100)
    assert frechet.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-8)
    assert frechet.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(frechet.frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-10)

def nuclear_norm_trace(features1, features2):
    """tr((S1 S2)^(1/2)) from the data: S_i = X_i^T X_i / (n_i - 1) gives the nuclear norm of X1 X2^T / sqrt(...)."""
    x1 = features1 - features1.mean(axis=0)
    x2 = features2 - features2.mean(axis=0)
    return np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt((len(x1) - 1) * (len(x2) - 1))

@pytest.mark.parametrize('num1, num2', [(10, 500), (500, 12), (7, 20), (40, 40)], ids=['first singular', 'second singular', 'both singular', 'equal'])
def test_rank_deficient_covariances_give_the_exact_finite_distance(num1, num2):
    rnd = np.random.default_rng(num1 + num2)
    dim = 64
    mu1, sigma1, features1 = random_stats(rnd, dim, num1)
    mu2, sigma2, features2 = random_stats(rnd, dim, num2)
    trace = frechet.trace_sqrt_product(sigma1, sigma2)
    assert np.isfinite(trace) and isinstance(trace, float)
    assert trace == pytest.approx(nuclear_norm_trace(features1, features2), rel=1e-7)
    distance = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert distance == pytest.approx(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace, rel=1e-9)

def test_a_collapsed_model_gives_a_finite_distance():
    rnd = np.random.default_rng(1)
    mu, sigma, _ = random_stats(rnd, 16, 100)
    collapsed = np.zeros([16, 16]) # Every image the same.
    assert frechet.frechet_distance(mu + 1, collapsed, mu, sigma) == pytest.approx(16 + np.trace(sigma), rel=1e-12)

def test_mismatched_or_non_finite_statistics_are_refused():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match='do not match'):
        frechet.frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match='NaN'):
        frechet.frechet_distance(mu, sigma * np.nan, mu, sigma)

#----------------------------------------------------------------------------
# Feature statistics.

def test_feature_moments_give_the_sample_mean_and_unbiased_covariance_at_any_batching():
    features = torch.randn([37, 5], dtype=torch.float32) * 3 + 2
    for splits in [[37], [1, 36], [10, 10, 10, 7]]:
        moments = frechet.FeatureMoments(5)
        for chunk in features.split(splits):
            moments.add(chunk)
        mu, sigma = moments.stats()
        assert mu.dtype == np.float64 and sigma.shape == (5, 5)
        np.testing.assert_allclose(mu, features.double().mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-10)

#----------------------------------------------------------------------------
# fid.py end to end with a TorchScript detector built here.

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('fid')
    data = random_images(60, seed=1)
    generated = random_images(40, seed=2)
    return dict(
        root        = root,
        detector    = save_torchscript(TinyInception(), root / 'detector.pt'),
        data_images = data,
        data        = write_image_folder(root / 'data', data),
        images      = generated,
        generated   = write_image_folder(root / 'generated', generated, subdirs=True),
    )

def run_fid(*args):
    return CliRunner().invoke(fid.main, [str(arg) for arg in args] + ['--device=cpu'])

def run_ok(*args):
    result = run_fid(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def fid_value(result):
    return float(result.stdout.strip().splitlines()[-1])

def detector_stats(images, dim=16):
    """mu and sigma of the tiny detector's features, computed directly (NHWC uint8 in)."""
    features = TinyInception(feature_dim=dim)(torch.as_tensor(images).permute(0, 3, 1, 2), return_features=True).double().detach().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)

@pytest.fixture(scope='module')
def ref_npz(files):
    dest = files['root'] / 'refs' / 'data.npz'
    run_ok('ref', '--data', files['data'], '--dest', dest, '--detector', files['detector'], '--workers=0', '--batch=16')
    return dest

def test_ref_writes_the_mean_and_covariance_of_the_detector_features(files, ref_npz):
    with np.load(ref_npz) as ref:
        assert sorted(ref.keys()) == ['detector', 'detector_sha256', 'mu', 'sigma']
        assert str(ref['detector']) == 'detector.pt' # An identity to check, not a path to load.
        assert str(ref['detector_sha256']) == hashlib.sha256(open(files['detector'], 'rb').read()).hexdigest()
        mu, sigma = detector_stats(files['data_images'])
        np.testing.assert_allclose(ref['mu'], mu, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ref['sigma'], sigma, rtol=1e-5, atol=1e-7)

def test_calc_prints_the_frechet_distance_to_the_reference(files, ref_npz):
    result = run_ok('calc', '--images', files['generated'], '--ref', ref_npz, '--num=40', '--detector', files['detector'], '--batch=7')
    expected = frechet.frechet_distance(*detector_stats(files['images']), *detector_stats(files['data_images']))
    assert fid_value(result) == pytest.approx(expected, rel=1e-5)
    assert 'fewer images than the 16 feature dimensions is biased' not in result.stderr # 40 images, 16 dimensions.

def test_calc_refuses_a_detector_other_than_the_one_recorded_in_the_reference(files, ref_npz, tmp_path):
    other = save_torchscript(TinyInception(seed=1), tmp_path / 'detector.pt') # Same name, other weights.
    result = run_fid('calc', '--images', files['generated'], '--ref', ref_npz, '--num=40', '--detector', other)
    assert result.exit_code != 0 and 'was made with detector detector.pt (sha256' in result.output
    # With no --detector, the default (Inception, offline here) is checked, never the recorded file loaded.
    result = run_fid('calc', '--images', files['generated'], '--ref', ref_npz, '--num=40')
    assert result.exit_code != 0 and 'inception-2015-12-05.pkl' in result.output

def test_a_reference_never_chooses_the_code_that_runs(files, tmp_path):
    """A crafted reference whose recorded detector is a malicious pickle next to it: nothing runs."""
    marker = tmp_path / 'marker'
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(MakeFile(str(marker)), f)
    mu, sigma = detector_stats(files['data_images'])
    np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma, detector=np.array('evil.pkl'))
    result = run_fid('calc', '--images', files['generated'], '--ref', tmp_path / 'ref.npz', '--num=40', '--detector', files['detector'])
    assert result.exit_code != 0 and 'was made with detector evil.pkl' in result.output
    result = run_fid('calc', '--images', files['generated'], '--ref', tmp_path / 'ref.npz', '--num=40')
    assert result.exit_code != 0
    assert not marker.exists()

class MakeFile:
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (open, (self.path, 'w'))

def test_fewer_images_than_feature_dimensions_give_a_warning():
    assert 'fewer images than the 2048 feature dimensions is biased' in frechet.few_images_warning(2047)
    assert frechet.few_images_warning(2048) is None and frechet.few_images_warning(50, feature_dim=16) is None

def test_fewer_images_than_dimensions_warn_and_still_give_a_finite_fid(files, tmp_path):
    detector = save_torchscript(TinyInception(feature_dim=64), tmp_path / 'wide.pt')
    ref = run_ok('ref', '--data', files['data'], '--dest', tmp_path / 'ref.npz', '--detector', detector, '--workers=0')
    assert 'fewer images than the 64 feature dimensions' in ref.stderr
    result = run_ok('calc', '--images', files['generated'], '--ref', tmp_path / 'ref.npz', '--num=40', '--detector', detector, '--workers=0')
    assert 'fewer images than the 64 feature dimensions' in result.stderr
    expected = frechet.frechet_distance(*detector_stats(files['images'], dim=64), *detector_stats(files['data_images'], dim=64))
    assert np.isfinite(fid_value(result)) and fid_value(result) == pytest.approx(expected, rel=1e-5)

def test_npz_sample_files_give_the_same_fid_as_the_same_images_as_pngs(files, ref_npz, tmp_path):
    np.savez(tmp_path / 'one.npz', samples=files['images'])
    folder = tmp_path / 'many'
    folder.mkdir()
    for k, chunk in enumerate(np.array_split(files['images'], 3)):
        np.savez_compressed(folder / f'samples_{k}.npz', samples=chunk, label=np.zeros([len(chunk), 10]))
    common = ['--ref', ref_npz, '--num=40', '--detector', files['detector'], '--workers=0']
    png = fid_value(run_ok('calc', '--images', files['generated'], *common))
    assert fid_value(run_ok('calc', '--images', tmp_path / 'one.npz', *common)) == png
    assert fid_value(run_ok('calc', '--images', folder, *common, '--workers=2')) == png

def test_guided_diffusion_npz_files_with_arr_0_are_read_with_their_labels(files, ref_npz, tmp_path):
    # guided-diffusion's samplers and the ADM evaluator's batches: np.savez(path, images, labels).
    labels = np.arange(len(files['images'])) % 7
    np.savez(tmp_path / 'adm.npz', files['images'], labels)
    common = ['--ref', ref_npz, '--num=40', '--detector', files['detector'], '--workers=0']
    assert fid_value(run_ok('calc', '--images', tmp_path / 'adm.npz', *common)) == fid_value(run_ok('calc', '--images', files['generated'], *common))
    data = image_sources.open_images(tmp_path / 'adm.npz', use_labels=True)
    assert len(data) == 40 and np.array_equal(data[5][0], files['images'][5].transpose(2, 0, 1)) and data.get_label(5).argmax() == 5 and data.get_label(5).shape == (7,)

def test_more_images_than_num_use_a_subset_chosen_by_the_seed(files, ref_npz):
    common = ['--images', files['generated'], '--ref', ref_npz, '--detector', files['detector'], '--workers=0']
    seed0 = fid_value(run_ok('calc', *common, '--num=20', '--seed=0'))
    assert fid_value(run_ok('calc', *common, '--num=20', '--seed=0', '--batch=3')) == pytest.approx(seed0, rel=1e-9)
    assert fid_value(run_ok('calc', *common, '--num=20', '--seed=1')) != pytest.approx(seed0, rel=1e-3)
    assert fid_value(run_ok('calc', *common, '--num=40')) != pytest.approx(seed0, rel=1e-3)

def test_grayscale_images_are_measured_as_rgb(files, ref_npz, tmp_path):
    gray = random_images(30, channels=1, seed=3)
    common = ['--ref', ref_npz, '--num=30', '--detector', files['detector'], '--workers=0']
    as_gray = fid_value(run_ok('calc', '--images', write_image_folder(tmp_path / 'gray', gray), *common))
    as_rgb = fid_value(run_ok('calc', '--images', write_image_folder(tmp_path / 'rgb', gray.repeat(3, axis=3)), *common))
    assert as_gray == as_rgb

def test_a_pickled_detector_module_works_like_its_torchscript_version(files, ref_npz, tmp_path):
    # EDM's Inception file is a pickle whose class source is embedded by torch_utils.persistence.
    pickled_class = persistence.persistent_class(TinyInception)
    with open(tmp_path / 'detector.pkl', 'wb') as f:
        pickle.dump(pickled_class(), f)
    with np.load(ref_npz) as ref: # EDM's format, which records no detector: both files are accepted.
        np.savez(tmp_path / 'edm-ref.npz', mu=ref['mu'], sigma=ref['sigma'])
    common = ['calc', '--images', files['generated'], '--ref', tmp_path / 'edm-ref.npz', '--num=40', '--workers=0']
    assert fid_value(run_ok(*common, '--detector', tmp_path / 'detector.pkl')) == pytest.approx(
        fid_value(run_ok(*common, '--detector', files['detector'])), rel=1e-6)

@pytest.mark.slow
def test_two_torchrun_ranks_give_the_fid_of_one_process(files, ref_npz):
    result = run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--', 'fid.py', 'calc', '--device=cpu',
        f'--images={files["generated"]}', f'--ref={ref_npz}', '--num=40', f'--detector={files["detector"]}', '--batch=8', '--workers=0'])
    assert result.returncode == 0, result.stderr
    single = run_ok('calc', '--images', files['generated'], '--ref', ref_npz, '--num=40', '--detector', files['detector'])
    assert result.stdout.strip().splitlines()[-1] == single.stdout.strip().splitlines()[-1]
    assert result.stdout.count('Calculating FID') == 1 # Rank 0 alone reports.

def test_help_shows_examples():
    result = CliRunner().invoke(fid.main, ['--help'])
    assert result.exit_code == 0 and 'fid.py calc --images=fid-tmp' in result.output and 'fid.py ref --data' in result.output

#----------------------------------------------------------------------------
# Bad input: exit code non-zero, one line that says what is wrong, and no reference file written.

def _write(path, content):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path

def _with_broken_image(folder, f):
    write_image_folder(folder, f['images'][:1])
    (folder / 'b.png').write_bytes(b'not a png')
    return folder

def _npy(path, array):
    with open(path, 'wb') as f:
        np.save(f, array)
    return path

def _pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
    return path

BAD_CALC_INPUTS = {
    'fewer images than --num':  (lambda t, f: ['--num=41'], 'Found 40 images'),
    'missing images':           (lambda t, f: ['--images', t / 'nope'], 'not found'),
    'npz without samples':      (lambda t, f: ['--images', np.savez(t / 'x.npz', images=f['images']) or t / 'x.npz'], 'has no "samples" or "arr_0" array'),
    'npz samples not images':   (lambda t, f: ['--images', np.savez(t / 'x.npz', samples=np.zeros([4, 8, 8])) or t / 'x.npz'], 'expected uint8 images'),
    'images and npz together':  (lambda t, f: ['--images', np.savez(t / 'x.npz', samples=f['images']) or write_image_folder(t, f['images'][:3])], 'both image files and .npz'),
    'unreadable image':         (lambda t, f: ['--images', _with_broken_image(t / 'i', f), '--num=2'], 'Cannot read image b.png'),
    'missing reference':        (lambda t, f: ['--ref', t / 'nope.npz'], 'Reference statistics not found'),
    'reference without mu':     (lambda t, f: ['--ref', np.savez(t / 'r.npz', mean=np.zeros(16)) or t / 'r.npz'], 'has no "mu" and "sigma"'),
    'reference not an npz':     (lambda t, f: ['--ref', _write(t / 'r.npz', 'hello')], 'Cannot read'),
    'reference is one array':   (lambda t, f: ['--ref', _npy(t / 'r.npz', np.zeros(3))], 'single .npy array'),
    'reference with NaN':       (lambda t, f: ['--ref', np.savez(t / 'r.npz', mu=np.full(16, np.nan), sigma=np.eye(16)) or t / 'r.npz'], 'holds NaN or infinite values'),
    'reference of another dim': (lambda t, f: ['--ref', np.savez(t / 'r.npz', mu=np.zeros(8), sigma=np.eye(8)) or t / 'r.npz'], '8-dimensional features'),
    'missing detector':         (lambda t, f: ['--detector', t / 'nope.pt'], 'Detector file not found'),
    'detector is text':         (lambda t, f: ['--detector', _write(t / 'd.pkl', 'not a detector')], 'neither a TorchScript archive nor a pickled torch module'),
    'detector is a zip':        (lambda t, f: ['--detector', np.savez(t / 'd.npz', x=1) or t / 'd.npz'], 'is an npz file, expected a TorchScript archive'),
    'detector is a dict':       (lambda t, f: ['--detector', _pickle(t / 'd.pkl', {'ema': 1})], 'holds a pickled dict'),
    'wrong image size':         (lambda t, f: ['--detector', save_torchscript(FixedSizeDetector(resolution=16), t / 'd.pt')], 'fails on uint8 images of 3x8x8'),
    'detector not features':    (lambda t, f: ['--detector', save_torchscript(torch.nn.Identity(), t / 'd.pt')], 'must return an [N, D] float feature matrix'),
    'offline default detector': (lambda t, f: ['--detector', 'http://127.0.0.1:9/inception-2015-12-05.pkl'], 'pass the file as a local path'),
}

@pytest.mark.parametrize('case', list(BAD_CALC_INPUTS))
def test_bad_calc_input_gives_one_line(files, ref_npz, tmp_path, case):
    make_args, message = BAD_CALC_INPUTS[case]
    defaults = dict(images=files['generated'], ref=ref_npz, num=40, detector=files['detector'])
    args = make_args(tmp_path, files)
    for key, value in defaults.items():
        if f'--{key}' not in args and not any(str(arg).startswith(f'--{key}=') for arg in args):
            args += [f'--{key}', value]
    result = run_fid('calc', *args, '--workers=0')
    assert result.exit_code != 0
    last_line = result.stderr.rstrip('\n').split('\n')[-1]
    assert last_line.startswith('Error: ') and message in last_line, result.output
    assert 'Traceback' not in result.output

def test_ref_with_bad_data_writes_nothing(files, tmp_path):
    folder = write_image_folder(tmp_path / 'mixed', random_images(3))
    write_image_folder(tmp_path / 'mixed' / 'sub', random_images(1, resolution=16))
    result = run_fid('ref', '--data', folder, '--dest', tmp_path / 'out' / 'ref.npz', '--detector', files['detector'], '--workers=0')
    assert result.exit_code != 0 and '16x16' in result.stderr.splitlines()[-1]
    assert not (tmp_path / 'out' / 'ref.npz').exists()

@pytest.mark.slow
def test_the_script_prints_one_error_line_without_traceback(files, tmp_path):
    result = run_cli([sys.executable, os.path.join(REPO, 'fid.py'), 'calc', f'--images={files["generated"]}', f'--ref={tmp_path / "nope.npz"}'])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f'Error: Reference statistics not found: {tmp_path / "nope.npz"}'
    assert 'Traceback' not in result.stderr

#----------------------------------------------------------------------------

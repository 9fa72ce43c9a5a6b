"""sscd.py and training/evaluation/copy_detection.py: SSCD features, RP and M scores against brute force, errors."""

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import sscd
from tiny_models import TinySSCD, random_images, save_torchscript, write_image_folder
from training.evaluation import copy_detection

#----------------------------------------------------------------------------
# Scores against brute force.

def unit_rows(rnd, num, dim):
    x = rnd.standard_normal([num, dim])
    return x / np.linalg.norm(x, axis=1, keepdims=True)

def brute_force_rpscore(source, target, t):
    return np.mean([np.dot(s, u) / np.linalg.norm(s) / np.linalg.norm(u) > t for s, u in zip(source, target)])

def brute_force_mscore(source, target, t):
    matched = [max(np.dot(s, u) / np.linalg.norm(s) / np.linalg.norm(u) for u in target) > t for s in source]
    return 1 - np.mean(matched)

def near_copies(rnd, originals, noise):
    copies = originals + noise * rnd.standard_normal(originals.shape)
    return copies / np.linalg.norm(copies, axis=1, keepdims=True)

def test_rpscore_is_the_fraction_of_matched_pairs_above_the_threshold():
    rnd = np.random.default_rng(0)
    source = unit_rows(rnd, 200, 16)
    target = np.concatenate([near_copies(rnd, source[:120], rnd.uniform(0, 0.5, size=[120, 1])), unit_rows(rnd, 80, 16)])
    target[:10] *= 7 # Unnormalized features: similarity is still the cosine.
    for t in [0.3, 0.6, 0.9]:
        expected = brute_force_rpscore(source, target, t)
        assert copy_detection.reproducibility_score(source, target, t) == pytest.approx(expected, abs=1e-12)
        assert 0 < expected < 1

@pytest.mark.parametrize('block_size', [pytest.param(1, marks=pytest.mark.slow), 7, 4096]) # Blocks of one row: slow.
def test_mscore_agrees_with_brute_force_at_any_block_size(block_size):
    rnd = np.random.default_rng(block_size)
    target = unit_rows(rnd, 90, 48)
    source = np.concatenate([near_copies(rnd, target[rnd.permutation(90)[:40]], rnd.uniform(0, 0.25, size=[40, 1])), unit_rows(rnd, 33, 48)])
    for t in [0.5, 0.6, 0.8]:
        expected = brute_force_mscore(source, target, t)
        assert copy_detection.memorization_score(source, target, t, block_size=block_size) == pytest.approx(expected, abs=1e-12)
        assert 0 < expected < 1

def test_similarities_within_float32_rounding_of_the_threshold_are_decided_exactly():
    # Pairs at cosine t + 2e-9 and t - 2e-9: float32 products cannot tell them apart, float64 can.
    t = 0.6
    rnd = np.random.default_rng(5)
    base = unit_rows(rnd, 64, 32)
    other = unit_rows(rnd, 64, 32)
    other -= (other * base).sum(axis=1, keepdims=True) * base # Orthogonal to base.
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    offsets = np.where(np.arange(64) % 2 == 0, 2e-9, -2e-9)
    cosines = t + offsets
    source = cosines[:, None] * base + np.sqrt(1 - cosines[:, None] ** 2) * other
    expected = brute_force_mscore(source, base, t)
    assert expected == pytest.approx(0.5)
    assert copy_detection.memorization_score(source, base, t) == expected
    assert copy_detection.reproducibility_score(source, base, t) == 0.5

def test_max_cosine_similarity_is_the_row_maximum_of_the_full_matrix():
    rnd = np.random.default_rng(1)
    source, target = rnd.standard_normal([50, 8]), rnd.standard_normal([70, 8])
    full = (source / np.linalg.norm(source, axis=1, keepdims=True)) @ (target / np.linalg.norm(target, axis=1, keepdims=True)).T
    best = copy_detection.max_cosine_similarity(source, target, block_size=16)
    np.testing.assert_allclose(best.numpy(), full.max(axis=1), atol=1e-6)

def test_block_by_block_normalization_gives_the_numbers_of_normalizing_everything_first():
    rnd = np.random.default_rng(2)
    source, target = rnd.standard_normal([45, 8]) * 3, rnd.standard_normal([70, 8]) * 0.2
    unit = lambda x: copy_detection.l2_normalize(torch.as_tensor(x, dtype=torch.float64)).to(torch.float32)
    whole = (unit(source) @ unit(target).T).max(dim=1).values
    assert torch.equal(copy_detection.max_cosine_similarity(source, target, block_size=len(target)), whole)
    blocked = copy_detection.max_cosine_similarity(source, target, block_size=7)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6)

#----------------------------------------------------------------------------
# sscd.py feature with a TorchScript model built here.

def run_sscd(*args):
    return CliRunner().invoke(sscd.main, [str(arg) for arg in args])

def run_ok(*args):
    result = run_sscd(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
    return save_torchscript(TinySSCD(), tmp_path_factory.mktemp('sscd') / 'sscd.pt')

def expected_features(images):
    """Descriptors of NHWC uint8 images done by hand: Pillow bilinear to 320x320, ImageNet normalization, L2."""
    inputs = []
    for image in images:
        pil = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).convert('RGB').resize((320, 320), PIL.Image.BILINEAR)
        x = np.asarray(pil, dtype=np.float32) / 255
        inputs.append(((x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).transpose(2, 0, 1))
    features = TinySSCD()(torch.as_tensor(np.stack(inputs), dtype=torch.float32)).detach().double().numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)

def test_feature_writes_normalized_descriptors_of_resized_images(tmp_path, model_path):
    images = random_images(11, resolution=8, seed=3)
    folder = write_image_folder(tmp_path / 'images', images, subdirs=True)
    run_ok('feature', '--images', folder, '--features', tmp_path / 'f.npz', '--model', model_path, '--batch=4', '--device=cpu')
    with np.load(tmp_path / 'f.npz') as npz:
        assert list(npz.keys()) == ['features']
        features = npz['features']
    assert features.shape == (11, 24) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected_features(images), atol=2e-6)

def test_features_copied_out_of_the_device_in_small_chunks_are_the_same(tmp_path, model_path):
    from training import image_sources
    images = image_sources.open_images(write_image_folder(tmp_path / 'images', random_images(9, resolution=8, seed=6)))
    model = copy_detection.load_sscd_model(model_path, verbose=False)
    whole = copy_detection.sscd_features(model, images, batch_size=4, num_workers=0, progress=False)
    one_row_at_a_time = copy_detection.sscd_features(model, images, batch_size=4, num_workers=0, progress=False, chunk_bytes=1)
    assert whole.device.type == 'cpu' and whole.shape == (9, 24) and torch.equal(whole, one_row_at_a_time)

def test_feature_reads_npz_samples_and_grayscale_images(tmp_path, model_path):
    gray = random_images(5, resolution=8, channels=1, seed=4)
    np.savez(tmp_path / 'samples.npz', samples=gray)
    run_ok('feature', '--images', tmp_path / 'samples.npz', '--features', tmp_path / 'f.npz', '--model', model_path, '--workers=0', '--device=cpu')
    np.testing.assert_allclose(np.load(tmp_path / 'f.npz')['features'], expected_features(gray), atol=2e-6)

def test_scores_of_features_from_the_same_images_are_perfect(tmp_path, model_path):
    images = random_images(6, resolution=8, seed=5)
    run_ok('feature', '--images', write_image_folder(tmp_path / 'a', images), '--features', tmp_path / 'a.npz', '--model', model_path, '--device=cpu')
    shuffled = write_image_folder(tmp_path / 'b', images[::-1])
    run_ok('feature', '--images', shuffled, '--features', tmp_path / 'b.npz', '--model', model_path, '--device=cpu', '--workers=0')
    rp = run_ok('rpscore', '--source', tmp_path / 'a.npz', '--target', tmp_path / 'a.npz').stdout.splitlines()[-1]
    rp_shuffled = run_ok('rpscore', '--source', tmp_path / 'a.npz', '--target', tmp_path / 'b.npz', '--t=0.99').stdout.splitlines()[-1]
    m = run_ok('mscore', '--source', tmp_path / 'a.npz', '--target', tmp_path / 'b.npz', '--t=0.99').stdout.splitlines()[-1]
    assert (float(rp), float(m)) == (1, 0)
    assert float(rp_shuffled) < 1

#----------------------------------------------------------------------------
# Bad input: one clear line.

def _features(path, n, d=24, key='features'):
    np.savez(path, **{key: np.ones([n, d], np.float32)})
    return path

def _with_broken_image(folder):
    write_image_folder(folder, random_images(1))
    (folder / 'b.png').write_bytes(b'not a png')
    return folder

BAD_INPUTS = {
    'rpscore, different lengths': (lambda t: ['rpscore', '--source', _features(t / 'a.npz', 5), '--target', _features(t / 'b.npz', 6)], 'has 5 images'),
    'rpscore, missing key':       (lambda t: ['rpscore', '--source', _features(t / 'a.npz', 5, key='x'), '--target', _features(t / 'b.npz', 5)], 'has no "features" array'),
    'rpscore, missing file':      (lambda t: ['rpscore', '--source', t / 'nope.npz', '--target', _features(t / 'b.npz', 5)], 'Feature file not found'),
    'rpscore, different dims':    (lambda t: ['rpscore', '--source', _features(t / 'a.npz', 5, 8), '--target', _features(t / 'b.npz', 5)], 'shapes [5, 8] and [5, 24]'),
    'mscore, different dims':     (lambda t: ['mscore', '--source', _features(t / 'a.npz', 5, 8), '--target', _features(t / 'b.npz', 7)], 'cannot be compared'),
    'mscore, not an npz':         (lambda t: ['mscore', '--source', (t / 'a.npz').write_text('x') and t / 'a.npz', '--target', _features(t / 'b.npz', 7)], 'Cannot read'),
    'mscore, threshold > 1':      (lambda t: ['mscore', '--source', _features(t / 'a.npz', 5), '--target', _features(t / 'b.npz', 7), '--t=2'], '--t'),
    'feature, model is text':     (lambda t: ['feature', '--images', write_image_folder(t / 'i', random_images(2)), '--features', t / 'f.npz',
                                       '--model', (t / 'm.pt').write_text('x') and t / 'm.pt'], 'neither a TorchScript archive'),
    'feature, wrong model':       (lambda t: ['feature', '--images', write_image_folder(t / 'i', random_images(2)), '--features', t / 'f.npz',
                                       '--model', save_torchscript(torch.nn.Identity(), t / 'm.pt')], 'expected [N, D] descriptors'),
    'feature, offline':           (lambda t: ['feature', '--images', write_image_folder(t / 'i', random_images(2)), '--features', t / 'f.npz',
                                       '--model', 'http://127.0.0.1:9/sscd_disc_large.torchscript.pt'], 'pass the file as a local path'),
    'feature, unreadable image':  (lambda t: ['feature', '--images', _with_broken_image(t / 'i'), '--features', t / 'f.npz', '--model', save_torchscript(TinySSCD(), t / 'm.pt')],
                                       'Cannot read image b.png'),
    'feature, no images':         (lambda t: ['feature', '--images', t / 'nope', '--features', t / 'f.npz'], 'not found'),
}

@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, case):
    make_args, message = BAD_INPUTS[case]
    result = run_sscd(*make_args(tmp_path), *(['--device=cpu'] if case.startswith('feature') else []))
    assert result.exit_code != 0
    last_line = result.stderr.rstrip('\n').split('\n')[-1]
    assert last_line.startswith('Error: ') and message in last_line, result.output
    assert not (tmp_path / 'f.npz').exists()

def test_help_shows_examples():
    result = CliRunner().invoke(sscd.main, ['--help'])
    assert result.exit_code == 0 and 'sscd.py mscore --source=sscd-a.npz --target=sscd-train.npz' in result.output

#----------------------------------------------------------------------------

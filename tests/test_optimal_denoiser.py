"""The optimal denoiser of a dataset: the closed form, one streamed pass, and sampling with it."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
from test_generate import read_images
from tiny_models import random_images, write_image_folder
from training.sampling.optimal_denoiser import OptimalDenoiser

#----------------------------------------------------------------------------

def two_pass_denoiser(images, x, sigma, chunk_size=64):
    """The straightforward formulation (as in Zhang et al.'s code): a pass for the largest logit,
    a pass for the weighted sums, each broadcasting x - y_i over all pixels."""
    y_all = torch.as_tensor(images).to(torch.float64) / 127.5 - 1
    x = x.to(torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
    logit = lambda y: -((x[:, None] - y[None]) ** 2).flatten(2).sum(dim=2) / (2 * sigma[:, None] ** 2)
    best = torch.cat([logit(y).max(dim=1, keepdim=True).values for y in y_all.split(chunk_size)], dim=1).max(dim=1).values
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    weighted = torch.zeros_like(x)
    for y in y_all.split(chunk_size):
        w = torch.exp(logit(y) - best[:, None])
        total += w.sum(dim=1)
        weighted += (w[:, :, None, None, None] * y[None]).sum(dim=1)
    return weighted / total[:, None, None, None]

@pytest.fixture(scope='module')
def images():
    return torch.as_tensor(random_images(50, resolution=8, seed=0)).permute(0, 3, 1, 2).contiguous()

@pytest.mark.parametrize('sigma', [0.002, 0.05, 0.3, 1.0, 10.0, 80.0])
@pytest.mark.parametrize('chunk_size', [7, 1024])
def test_streamed_pass_equals_the_two_pass_formula(images, sigma, chunk_size):
    denoiser = OptimalDenoiser(images, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(0)
    clean = images[torch.randint(50, [6], generator=gen)].to(torch.float64) / 127.5 - 1
    x = clean + sigma * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    got = denoiser(x, torch.tensor(sigma, dtype=torch.float64))
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got, two_pass_denoiser(images, x, sigma), rtol=1e-9, atol=1e-9)

def test_one_sigma_per_sample_is_the_same_as_separate_calls(images):
    denoiser = OptimalDenoiser(images, chunk_size=16)
    sigma = torch.tensor([0.01, 0.5, 5.0], dtype=torch.float64)
    x = torch.randn([3, 3, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    together = denoiser.denoise(x, sigma.reshape(3, 1, 1, 1), step=0)
    torch.testing.assert_close(together, two_pass_denoiser(images, x, sigma), rtol=1e-9, atol=1e-9)
    for k in range(3):
        torch.testing.assert_close(together[k:k + 1], denoiser(x[k:k + 1], sigma[k]), rtol=1e-12, atol=1e-12)

def test_a_training_image_at_tiny_sigma_denoises_to_itself(images):
    denoiser = OptimalDenoiser(images, chunk_size=16)
    y = images.to(torch.float64) / 127.5 - 1
    torch.testing.assert_close(denoiser(y, 1e-3), y, rtol=0, atol=1e-12)

def test_far_from_every_image_at_the_smallest_sigma_there_is_no_nan(images):
    denoiser = OptimalDenoiser(images, chunk_size=16)
    x = 80 * torch.randn([4, 3, 8, 8], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    result = denoiser(x, 0.002)
    assert torch.isfinite(result).all()
    nearest = ((x[:, None] - (images.to(torch.float64) / 127.5 - 1)[None]) ** 2).flatten(2).sum(2).argmin(dim=1)
    torch.testing.assert_close(result, images[nearest].to(torch.float64) / 127.5 - 1, rtol=0, atol=1e-12)

def test_the_optimal_denoiser_of_one_image_returns_that_image(images):
    denoiser = OptimalDenoiser(images[:1])
    x = torch.randn([5, 3, 8, 8], dtype=torch.float64)
    for sigma in [0.002, 1, 1000]:
        torch.testing.assert_close(denoiser(x, sigma), (images[:1].to(torch.float64) / 127.5 - 1).expand(5, -1, -1, -1))

def test_at_huge_sigma_it_returns_the_dataset_mean(images):
    denoiser = OptimalDenoiser(images)
    mean = (images.to(torch.float64) / 127.5 - 1).mean(dim=0)
    torch.testing.assert_close(denoiser(torch.zeros([1, 3, 8, 8], dtype=torch.float64), 1e6)[0], mean, rtol=0, atol=1e-9)

#----------------------------------------------------------------------------
# generate.py --optimal_denoiser.

def generate_ok(*args):
    result = CliRunner().invoke(generate.main, ['--device=cpu', *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def test_generate_with_the_optimal_denoiser_reproduces_training_images(tmp_path):
    training = random_images(5, resolution=8, seed=3)
    data = write_image_folder(tmp_path / 'data', training)
    generate_ok('--optimal_denoiser', '--dataset', data, '--outdir', tmp_path / 'out', '--seeds=0-11', '--steps=12')
    generated = read_images(tmp_path / 'out')
    assert len(generated) == 12
    for image in generated.values():
        assert any(np.array_equal(image, y) for y in training) # Exactly a training image: it memorizes.
    assert len({image.tobytes() for image in generated.values()}) > 1

def test_optimal_denoiser_images_depend_only_on_the_seed(tmp_path):
    data = write_image_folder(tmp_path / 'data', random_images(40, resolution=8, seed=4))
    for batch in [1, 5]:
        generate_ok('--optimal_denoiser', '--dataset', data, '--outdir', tmp_path / f'b{batch}', '--seeds=0-5', '--steps=5', f'--batch={batch}')
    one, five = read_images(tmp_path / 'b1'), read_images(tmp_path / 'b5')
    assert sorted(one) == sorted(five) and all(np.array_equal(one[name], five[name]) for name in one)

def test_euler_steps_are_the_default_and_heun_can_be_asked_for(tmp_path):
    data = write_image_folder(tmp_path / 'data', random_images(40, resolution=8, seed=4))
    common = ['--optimal_denoiser', '--dataset', data, '--seeds=0-3', '--steps=3']
    generate_ok(*common, '--outdir', tmp_path / 'default')
    generate_ok(*common, '--outdir', tmp_path / 'euler', '--solver=euler')
    generate_ok(*common, '--outdir', tmp_path / 'heun', '--solver=heun')
    default, euler, heun = (read_images(tmp_path / name) for name in ['default', 'euler', 'heun'])
    assert all(np.array_equal(default[name], euler[name]) for name in default)
    assert any(not np.array_equal(default[name], heun[name]) for name in default)

@pytest.mark.parametrize('args, message', [
    (['--optimal_denoiser'], '--optimal_denoiser needs --dataset'),
    (['--optimal_denoiser', '--dataset', 'nope.zip'], 'Dataset not found'),
    (['--network', 'no-such-network.pkl'], 'Network file not found: no-such-network.pkl'),
    (['--network', 'net.pkl', '--dataset', 'data.zip'], '--dataset is only used with --optimal_denoiser'),
])
def test_bad_optimal_denoiser_options_give_one_line(tmp_path, args, message):
    result = CliRunner().invoke(generate.main, ['--device=cpu', '--outdir', str(tmp_path / 'out'), *args])
    assert result.exit_code != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('Error: ') and message in last_line
    assert not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------

def test_images_streamed_in_small_chunks_give_the_resident_result(images):
    gen = torch.Generator().manual_seed(3)
    x = images[:5].to(torch.float64) / 127.5 - 1 + 0.3 * torch.randn([5, 3, 8, 8], generator=gen, dtype=torch.float64)
    resident = OptimalDenoiser(images, chunk_size=len(images), resident=True)(x, 0.3)
    streamed = OptimalDenoiser(images, chunk_size=3, resident=False)(x, 0.3)
    torch.testing.assert_close(streamed, resident, rtol=1e-12, atol=1e-12)
    assert torch.equal(OptimalDenoiser(images, chunk_size=3, resident=True)(x, 0.3), streamed) # Same chunks, same numbers.

def test_the_images_stay_in_host_memory_when_the_module_moves_and_go_to_a_gpu_only_when_they_fit(images):
    denoiser = OptimalDenoiser(images).to(torch.device('meta'))
    assert denoiser.images.device.type == 'cpu' and denoiser.half_sq_norms.is_meta
    nbytes = images.numel() # uint8
    assert denoiser.keeps_images_on('cuda', free_bytes=4 * nbytes) and not denoiser.keeps_images_on('cuda', free_bytes=nbytes)
    assert not OptimalDenoiser(images, resident=False).keeps_images_on('cpu')
    assert OptimalDenoiser(images, resident=True).keeps_images_on('cuda', free_bytes=0)
    x = torch.zeros([2, 3, 8, 8], device='meta')
    assert denoiser(x, 1.0).shape == x.shape # Streamed to a device they are not on.

"""The Python examples of README.md ("## Python API") and docs/architecture.md run as written and
give what they claim: generate.py's images, and eps norms along the sampling chain."""

import os
import re

import numpy as np
import pytest
import torch

from conftest import REPO
from training.evaluation import exposure_bias_metrics as metrics
from training.sampling import denoisers
from training.sampling import generation

#----------------------------------------------------------------------------

def python_block(path, heading):
    """The first ```python block after `heading` (a line of its own) in a Markdown file."""
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
        text = f.read()
    assert text.count(f'\n{heading}\n') == 1, f'{path} has no single "{heading}"'
    after = text.split(f'\n{heading}\n', 1)[1]
    match = re.search(r'^```python\n(.*?)^```$', after, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, f'no python block after "{heading}" in {path}'
    return match.group(1)

def with_fewer_steps(code, num_steps):
    """The example with num_steps=N replaced, so that the test runs in seconds (exactly one occurrence)."""
    changed, count = re.subn(r'num_steps=\d+', f'num_steps={num_steps}', code)
    assert count == 1
    return changed

@pytest.fixture
def one_thread():
    """Sample with one CPU thread, so that 16 seeds are one unpadded batch in generate.py too (min_eval_batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

#----------------------------------------------------------------------------

@pytest.mark.slow
def test_readme_python_api_example_gives_generate_pys_images_and_eps_norms(one_thread, capsys):
    code = with_fewer_steps(python_block('README.md', '## Python API'), 5)
    scope = {}
    exec(compile(code, 'README.md:Python API', 'exec'), scope)
    net, seeds, settings, corrections = scope['net'], scope['seeds'], scope['settings'], scope['corrections']
    assert 'epsilon_scaling(eps_scaler=1.0006' in capsys.readouterr().out # The composed denoiser says what it is.

    images = scope['images']
    assert images.dtype == np.uint8 and images.shape == (len(seeds), net.img_resolution, net.img_resolution, net.img_channels)
    batches = list(generation.generate_images(net, seeds, sampler_kwargs=settings, corrections=corrections))
    assert len(batches) == 1 and batches[0].seeds == seeds
    assert np.array_equal(images, batches[0].images) # What generate.py saves for these seeds.
    plain, = generation.generate_images(net, seeds, sampler_kwargs=settings)
    assert not np.array_equal(images, plain.images) # Epsilon scaling did something.

    eps_norms, variances = scope['eps_norms'], scope['variances']
    assert len(eps_norms) == len(variances) == 5 and np.isfinite(eps_norms).all() and np.isfinite(variances).all()
    # At sigma_max the predicted noise is nearly the noise itself: norm about sqrt(C*H*W).
    assert abs(eps_norms[0] / np.sqrt(net.img_channels * net.img_resolution ** 2) - 1) < 0.1
    expected_norms, expected_variances = metrics.consecutive_statistics(net, seeds, settings, eps_scaler=corrections.eps_scaler)
    assert np.array_equal(eps_norms, expected_norms) and np.array_equal(variances, expected_variances)

def test_architecture_example_correction_is_a_denoiser_that_composes(one_thread, capsys):
    code = with_fewer_steps(python_block('docs/architecture.md', '## Example: a correction that rescales the denoised output'), 4)
    scope = {}
    exec(compile(code, 'docs/architecture.md:Example', 'exec'), scope) # Asserts that factor 1 changes no pixel.
    assert 'epsilon_scaling(eps_scaler=1.0006, kappa=0.0) -> output_scaling(factor=1.0)' in capsys.readouterr().out
    with_output_scaling, net, seeds, settings = scope['with_output_scaling'], scope['net'], scope['seeds'], scope['settings']

    corrections = scope['corrections']
    shrunk, = generation.generate_images(net, seeds, sampler_kwargs=settings,
        make_denoiser=lambda net, labels: with_output_scaling(generation.compose(net, labels, corrections), factor=0.9))
    assert not np.array_equal(shrunk.images, scope['plain'].images) # Only the factor differs.

    # Wrapped around a denoiser with its own second order and churn, it keeps both (as guidance has them).
    first = lambda x, sigma, step: x * 0.5
    second = lambda x, sigma, step: x * 0.25
    churn = lambda step, S_churn, S_noise: (torch.full([2], 4.0, dtype=torch.float64), torch.ones([2], dtype=torch.float64))
    inner = denoisers.Denoiser(first, second, churn, layers=('inner',))
    outer = with_output_scaling(inner, factor=2.0)
    x = torch.ones([2, 1, 2, 2], dtype=torch.float64)
    assert torch.equal(outer.first_order(x, 1.0, 0), x) and torch.equal(outer.second_order(x, 1.0, 0), x * 0.5)
    assert outer.churn is churn and outer.layers == ('inner', 'output_scaling(factor=2.0)')

#----------------------------------------------------------------------------

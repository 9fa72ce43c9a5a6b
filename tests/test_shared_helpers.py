"""One helper for each small repeated thing: each gives, bit for bit, what the inline spellings it
replaced gave, and those spellings are gone from the library and the scripts."""

import glob
import io
import os
import re
import tokenize

import numpy as np
import pytest
import torch

from conftest import REPO, make_tiny_net
from torch_utils import misc
from training import bundled
from training import checkpoint
from training import dataset as dataset_lib
from training.guidance import discriminator_guidance as dg
from training.sampling import sampler

#----------------------------------------------------------------------------
# Real inputs: the bundled digits and the bundled network's sampler noise levels.

@pytest.fixture(scope='module')
def digits():
    """uint8 [256, 1, 16, 16] bundled training digits."""
    data = dataset_lib.ImageFolderDataset(bundled.DATA)
    return torch.as_tensor(np.stack([data[i][0] for i in range(256)]))

@pytest.fixture(scope='module')
def bundled_net():
    return checkpoint.load_network(bundled.NETWORK, verbose=False)

def noise_levels(net):
    """Float64 sigmas as the samplers ask about them: EDM's 18 and 256 steps, and a log-spaced sweep."""
    return torch.cat([sampler.edm_time_steps(net, 18)[:-1], sampler.edm_time_steps(net, 256)[:-1],
        torch.logspace(-4, 2.5, 4001, dtype=torch.float64)])

#----------------------------------------------------------------------------
# uint8 <-> [-1, 1].

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_uint8_to_model_range_is_the_old_division_to_the_bit(digits, dtype):
    assert torch.equal(misc.uint8_to_model_range(digits, dtype), digits.to(dtype) / 127.5 - 1)
    assert misc.uint8_to_model_range(digits).dtype == torch.float32

def test_the_classifier_detectors_grey_average_is_unchanged(digits):
    rgb = digits.repeat(1, 3, 1, 1)
    rgb[:, 1] = rgb[:, 1].flip(-1) # Channels that differ, so that the average is not one of them.
    old = rgb.to(torch.float32).mean(dim=1, keepdim=True) / 127.5 - 1
    assert torch.equal(misc.uint8_to_model_range(rgb.to(torch.float32).mean(dim=1, keepdim=True)), old)

def test_uint8_to_model_range_compiles_to_the_same_numbers_in_torchscript(digits):
    scripted = torch.jit.script(misc.uint8_to_model_range)
    assert torch.equal(scripted(digits, torch.float32), digits.to(torch.float32) / 127.5 - 1)

def test_model_range_to_uint8_is_the_old_rounding_and_inverts_the_forward_map(digits):
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn([64, 1, 16, 16], generator=generator, dtype=torch.float64) * 0.7 # Some beyond [-1, 1].
    assert torch.equal(misc.model_range_to_uint8(samples), (samples * 127.5 + 128).clip(0, 255).to(torch.uint8))
    assert torch.equal(misc.model_range_to_uint8(misc.uint8_to_model_range(digits, torch.float64)), digits)

#----------------------------------------------------------------------------
# The device of a module.

def test_module_device_is_that_of_the_first_parameter_or_buffer(bundled_net):
    old = next(iter(list(bundled_net.parameters()) + list(bundled_net.buffers())), torch.zeros([])).device
    assert misc.module_device(bundled_net) == old == torch.device('cpu')
    buffers_only = torch.nn.Module()
    buffers_only.register_buffer('images', torch.zeros([2], device='meta'))
    assert misc.module_device(buffers_only) == torch.device('meta')
    on_meta = make_tiny_net().to('meta')
    assert misc.module_device(on_meta) == next(iter(misc.params_and_buffers(on_meta))).device == torch.device('meta')

def test_module_device_of_a_module_without_tensors_is_the_default():
    assert misc.module_device(torch.nn.ReLU()) == torch.device('cpu')
    assert misc.module_device(torch.nn.ReLU(), default='meta') == torch.device('meta')

def test_module_device_of_a_torchscript_module():
    scripted = torch.jit.script(torch.nn.Linear(2, 3).to('meta'))
    assert misc.module_device(scripted) == torch.device('meta')

#----------------------------------------------------------------------------
# VP time from sigma: one square root of the quadratic for the sampler and for guidance.

def test_the_samplers_vp_time_is_the_old_formula_to_the_bit(bundled_net):
    sigma = noise_levels(bundled_net)
    for beta_d, beta_min in [(19.9, 0.1), tuple(sampler.ablation_sigma_steps(bundled_net, 18, discretization='vp')[1].values())]:
        old = ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d
        assert torch.equal(sampler.vp_sigma_inv(beta_d, beta_min)(sigma), old)

def test_guidances_vp_time_is_the_old_formula_to_the_bit(bundled_net):
    sigma = noise_levels(bundled_net)
    b = dg.VP_BETA_MAX - dg.VP_BETA_MIN
    old = (torch.sqrt(dg.VP_BETA_MIN ** 2 + 2 * b * torch.log1p(sigma ** 2)) - dg.VP_BETA_MIN) / b
    assert torch.equal(dg.vp_time_from_sigma(sigma), old)

def test_importance_sampled_times_are_the_old_ones_to_the_bit():
    t = dg.sample_importance_time(4096, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    a_min = dg.vp_importance_antiderivative(torch.tensor(1e-5, dtype=torch.float64))
    a_max = dg.vp_importance_antiderivative(torch.tensor(1.0, dtype=torch.float64))
    u = torch.rand(4096, generator=generator, dtype=torch.float64)
    integral = torch.log1p(torch.exp(a_min + u * (a_max - a_min)))
    b = dg.VP_BETA_MAX - dg.VP_BETA_MIN
    old = ((torch.sqrt(dg.VP_BETA_MIN ** 2 + 2 * b * integral) - dg.VP_BETA_MIN) / b).to(torch.float32)
    assert torch.equal(t, old)

def test_vp_time_inverts_the_vp_schedule():
    t = torch.linspace(1e-3, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(sampler.vp_sigma_inv(19.9, 0.1)(sampler.vp_sigma(19.9, 0.1)(t)), t, rtol=1e-9, atol=1e-12)

#----------------------------------------------------------------------------
# The old spellings are gone. Code only (docstrings and comments may state the formulas), outside
# the three modules embedded in network pickles (their source is part of the bundled pickle) and
# gpu_check.py's NVIDIA-EDM worker, which must import nothing of this repository.

EXEMPT = {'training/networks.py', 'training/loss.py', 'training/augment.py', 'benchmarks/gpu_check.py'}
OLD_SPELLINGS = { # idea: (pattern, the file that defines its helper and so spells it once)
    'uint8 -> [-1, 1]':   (r'/\s*127\.5\s*-\s*1\b', 'torch_utils/misc.py'),
    '[-1, 1] -> uint8':   (r'\*\s*127\.5\s*\+\s*128', 'torch_utils/misc.py'),
    'device of a module': (r'parameters\(\)\)\s*\+\s*list\(|params_and_buffers\([^()]*\)\)\)\.device|\.parameters\(\)\)\)?\.device', None),
    'VP time from sigma': (r'beta_min\s*\*\*\s*2\s*\+\s*2\s*\*', 'training/sampling/sampler.py'),
}

def code_only(path):
    """The source of `path` with its strings and comments blanked out."""
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines(keepends=True)
    blank = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(''.join(lines)).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            (row, col), (end_row, end_col) = tok.start, tok.end
            for r in range(row, end_row + 1):
                first, last = (col if r == row else 0), (end_col if r == end_row else len(lines[r - 1]))
                blank[r - 1][first:last] = ' ' * (last - first)
    return ''.join(''.join(chars) for chars in blank)

def library_and_script_files():
    patterns = ['*.py', 'training/**/*.py', 'torch_utils/*.py', 'dnnlib/*.py', 'benchmarks/*.py']
    files = sorted({os.path.relpath(p, REPO) for pattern in patterns for p in glob.glob(os.path.join(REPO, pattern), recursive=True)})
    return [f for f in files if f.replace(os.sep, '/') not in EXEMPT]

def test_old_spellings_are_gone_from_the_library_and_the_scripts():
    files = library_and_script_files()
    assert 'training/sampling/generation.py' in files and 'generate.py' in files
    found = []
    for path in files:
        code = code_only(os.path.join(REPO, path))
        for idea, (pattern, owner) in OLD_SPELLINGS.items():
            count = len(re.findall(pattern, code, flags=re.IGNORECASE))
            if count > (1 if path.replace(os.sep, '/') == owner else 0):
                found.append(f'{path}: {idea} ({count}x)')
    assert not found, 'spelled inline instead of calling the helper: ' + '; '.join(found)

def test_the_spelling_check_would_see_an_old_spelling():
    assert re.search(OLD_SPELLINGS['uint8 -> [-1, 1]'][0], 'x = images.to(torch.float32) / 127.5 - 1')
    assert re.search(OLD_SPELLINGS['VP time from sigma'][0], '((beta_min ** 2 + 2 * beta_d * x).sqrt()', flags=re.IGNORECASE)
    assert re.search(OLD_SPELLINGS['device of a module'][0], 'list(m.parameters()) + list(m.buffers())')
    with open(os.path.join(REPO, 'training/molrg.py'), encoding='utf-8') as f:
        assert '/ 127.5 - 1' in f.read() # In a docstring, which may state the formula...
    assert '/ 127.5 - 1' not in code_only(os.path.join(REPO, 'training/molrg.py')) # ...and is blanked out.

#----------------------------------------------------------------------------

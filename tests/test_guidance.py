"""Discriminator guidance (DG, SEDM-G++): networks, the guidance term, the sampler part, the CLIs."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import train_classifier
import train_discriminator
from conftest import make_tiny_net, run_cli
from tiny_models import random_images, write_image_folder
from torch_utils import misc
from training.guidance import adm_encoder
from training.guidance import discriminator_guidance as dg
from training.sampling import epsilon_scaling
from training.sampling import generation
from training.guidance import guidance_training
from training.sampling import sampler

#----------------------------------------------------------------------------
# The published layouts, written out from the architecture description (guided-diffusion's
# EncoderUNetModel as DG's create_classifier builds it), independently of adm_encoder.

def resblock_shapes(prefix, cin, cout, emb):
    shapes = {
        f'{prefix}.in_layers.0.weight': [cin], f'{prefix}.in_layers.0.bias': [cin],
        f'{prefix}.in_layers.2.weight': [cout, cin, 3, 3], f'{prefix}.in_layers.2.bias': [cout],
        f'{prefix}.emb_layers.1.weight': [2 * cout, emb], f'{prefix}.emb_layers.1.bias': [2 * cout], # Scale and shift.
        f'{prefix}.out_layers.0.weight': [cout], f'{prefix}.out_layers.0.bias': [cout],
        f'{prefix}.out_layers.3.weight': [cout, cout, 3, 3], f'{prefix}.out_layers.3.bias': [cout],
    }
    if cin != cout:
        shapes.update({f'{prefix}.skip_connection.weight': [cout, cin, 1, 1], f'{prefix}.skip_connection.bias': [cout]})
    return shapes

def attention_shapes(prefix, ch):
    return {f'{prefix}.norm.weight': [ch], f'{prefix}.norm.bias': [ch], f'{prefix}.qkv.weight': [3 * ch, ch, 1],
        f'{prefix}.qkv.bias': [3 * ch], f'{prefix}.proj_out.weight': [ch, ch, 1], f'{prefix}.proj_out.bias': [ch]}

def published_layout(image_size, in_channels, width, depth, channel_mult, attention_px, outputs, num_classes=0):
    emb = 4 * width
    shapes = {'time_embed.0.weight': [emb, width], 'time_embed.0.bias': [emb], 'time_embed.2.weight': [emb, emb], 'time_embed.2.bias': [emb]}
    if num_classes:
        shapes['label_emb.weight'] = [num_classes, emb]
    shapes.update({'input_blocks.0.0.weight': [width, in_channels, 3, 3], 'input_blocks.0.0.bias': [width]})
    block, ch, res = 1, width, image_size
    for level, mult in enumerate(channel_mult):
        for _ in range(depth):
            shapes.update(resblock_shapes(f'input_blocks.{block}.0', ch, mult * width, emb))
            ch = mult * width
            if res in attention_px:
                shapes.update(attention_shapes(f'input_blocks.{block}.1', ch))
            block += 1
        if level < len(channel_mult) - 1: # Down-sampling residual block: same channels, no parameters of its own for pooling.
            shapes.update(resblock_shapes(f'input_blocks.{block}.0', ch, ch, emb))
            block += 1
            res //= 2
    shapes.update(resblock_shapes('middle_block.0', ch, ch, emb))
    shapes.update(attention_shapes('middle_block.1', ch))
    shapes.update(resblock_shapes('middle_block.2', ch, ch, emb))
    shapes.update({'out.0.weight': [ch], 'out.0.bias': [ch], 'out.2.positional_embedding': [ch, res * res + 1],
        'out.2.qkv_proj.weight': [3 * ch, ch, 1], 'out.2.qkv_proj.bias': [3 * ch],
        'out.2.c_proj.weight': [outputs, ch, 1], 'out.2.c_proj.bias': [outputs]})
    return shapes

PUBLISHED = {
    # 32x32_classifier.pt: width 128, depth 4, channel_mult (1, 2, 4), attention at 32/16/8 px, 1000 outputs.
    'classifier-32': (published_layout(32, 3, 128, 4, (1, 2, 4), (32, 16, 8), 1000), adm_encoder.classifier_kwargs(32)),
    # ADM's 64x64 classifier as DG uses it: channel_mult (1, 2, 3, 4).
    'classifier-64': (published_layout(64, 3, 128, 4, (1, 2, 3, 4), (32, 16, 8), 1000), adm_encoder.classifier_kwargs(64)),
    # discriminator_60.pt / discriminator_250.pt: 512 feature channels at 8x8, width 128, depth 2, one output.
    'discriminator': (published_layout(8, 512, 128, 2, (1,), (8,), 1), adm_encoder.discriminator_kwargs()),
    # DG's conditional discriminators embed classes with guided-diffusion's 1000-row table.
    'discriminator-cond': (published_layout(8, 512, 128, 2, (1,), (8,), 1, num_classes=1000), adm_encoder.discriminator_kwargs(cond=True)),
}

@pytest.mark.parametrize('name', list(PUBLISHED))
def test_published_state_dict_layouts_match_key_for_key_and_shape_for_shape(name):
    expected, kwargs = PUBLISHED[name]
    with torch.device('meta'):
        net = adm_encoder.EncoderUNet(**kwargs)
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert adm_encoder.describe_mismatch(net, {k: torch.empty(v, device='meta') for k, v in expected.items()}) == ''
    if name.startswith('classifier'):
        assert (net.feature_channels, net.feature_resolution) == (512, 8) # What the discriminator takes.

@pytest.mark.parametrize('name,resolution', [('classifier-32', 32), ('classifier-64', 64), ('discriminator', 8), ('discriminator-cond', 8)])
def test_layout_is_read_back_from_a_published_state_dict(name, resolution):
    expected, kwargs = PUBLISHED[name]
    inferred = adm_encoder.infer_kwargs({k: torch.empty(v, device='meta') for k, v in expected.items()}, resolution)
    kwargs = dict(kwargs)
    kwargs.pop('head_channels')
    assert inferred == kwargs

def test_mismatch_names_missing_unexpected_and_misshapen_keys():
    expected, kwargs = PUBLISHED['classifier-32']
    with torch.device('meta'):
        net = adm_encoder.EncoderUNet(**kwargs)
    state = {k: torch.empty(v, device='meta') for k, v in expected.items()}
    del state['middle_block.1.qkv.bias']
    state['label_emb.weight'] = torch.empty([10, 512], device='meta')
    state['out.2.c_proj.weight'] = torch.empty([10, 512, 1], device='meta')
    message = adm_encoder.describe_mismatch(net, state)
    assert 'missing keys: middle_block.1.qkv.bias' in message
    assert 'unexpected keys: label_emb.weight' in message
    assert 'out.2.c_proj.weight is [10, 512, 1], expected [1000, 512, 1]' in message

#----------------------------------------------------------------------------
# Small networks of the same family, with every weight non-trivial.

def tiny_encoder(kwargs, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = adm_encoder.EncoderUNet(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1) # Zero-initialized layers would hide bugs.
    return net.to(dtype).eval().requires_grad_(False)

def tiny_pair(resolution=8, cond=False, dtype=torch.float32, width=16):
    classifier = tiny_encoder(adm_encoder.classifier_kwargs(resolution, model_channels=width, num_res_blocks=1, num_outputs=4), seed=1, dtype=dtype)
    disc = tiny_encoder(adm_encoder.discriminator_kwargs(classifier.feature_channels, classifier.feature_resolution, cond=cond,
        model_channels=width, num_res_blocks=1, num_classes=10), seed=2, dtype=dtype)
    return classifier, disc

def save_pair(tmp_path, cond=False, resolution=8):
    classifier, disc = tiny_pair(resolution, cond=cond)
    guidance_training.save_state_dict(tmp_path / 'cls.pt', classifier)
    guidance_training.save_state_dict(tmp_path / 'disc.pt', disc)
    return str(tmp_path / 'cls.pt'), str(tmp_path / 'disc.pt')

def test_saved_state_dicts_load_strictly_into_the_layout_read_back_from_them(tmp_path):
    classifier, disc = tiny_pair(cond=True)
    cls_path, disc_path = save_pair(tmp_path, cond=True)
    loaded_cls = dg.load_classifier(cls_path, 8, 3)
    loaded_disc = dg.load_discriminator(disc_path, loaded_cls, cond=True)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    labels = torch.eye(10)[[1, 2, 3]]
    assert torch.equal(loaded_cls(x, t), classifier(x, t))
    assert torch.equal(loaded_disc(loaded_cls.features(x, t), t, labels), disc(classifier.features(x, t), t, labels))

#----------------------------------------------------------------------------
# The VP mapping and the guidance term.

def test_sigma_maps_to_the_vp_time_with_the_same_noise_to_signal_ratio():
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    t = dg.vp_time_from_sigma(sigma)
    mean, std = dg.vp_marginal(t)
    assert torch.allclose(std / mean, sigma, rtol=1e-9)
    assert (t > 0).all() and (t[1:] > t[:-1]).all()
    # sigma = 1: 9.95 t^2 + 0.1 t = log 2 by hand gives t = 0.2589; EDM's sigma_max = 80 is VP time 0.9335.
    assert abs(float(t[2]) - 0.2589) < 1e-4 and abs(float(t[4]) - 0.9335) < 1e-4

def test_cosine_time_has_the_linear_schedules_signal_level():
    t = torch.linspace(0.01, 0.99, 20, dtype=torch.float64)
    t_cos = dg.cosine_time_from_linear(t)
    s = dg.COSINE_S
    alpha_bar = torch.cos((t_cos + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    mean, _std = dg.vp_marginal(t)
    assert torch.allclose(alpha_bar.sqrt(), mean, rtol=1e-9)
    assert torch.equal(dg.classifier_time(t, 32), t) and torch.equal(dg.classifier_time(t, 64), t_cos)

def test_importance_sampled_times_follow_their_density():
    t = dg.sample_importance_time(200000, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    assert t.min() >= 1e-5 and t.max() <= 1
    edges = torch.tensor([1e-5, 1e-3, 1e-2, 0.05, 0.2, 0.5, 1.0], dtype=torch.float64)
    grid = [torch.linspace(float(a), float(b), 20001, dtype=torch.float64) for a, b in zip(edges[:-1], edges[1:])]
    mass = torch.stack([torch.trapezoid(dg.importance_density(g), g) for g in grid])
    assert abs(float(mass.sum()) - 1) < 1e-3
    counts = torch.histogram(t, edges).hist / len(t)
    assert torch.allclose(counts, mass, atol=4e-3) # Most mass sits at small t, unlike uniform sampling.
    assert mass[:2].sum() > 0.3

def test_guidance_term_is_minus_sigma_squared_times_the_gradient_of_the_log_ratio():
    classifier, disc = tiny_pair(dtype=torch.float64)
    guidance = dg.DiscriminatorGuidance(classifier, disc, img_resolution=8, time_min=0, time_max=1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor(0.7, dtype=torch.float64)
    c, log_r = guidance.correction(x, sigma)
    assert torch.allclose(log_r, guidance.log_ratio(x, sigma))
    assert c.abs().max() > 0
    # Central differences of log r along random directions against <grad log r, v> = <c, v> / -sigma^2.
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        v = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        eps = 1e-5
        fd = (guidance.log_ratio(x + eps * v, sigma) - guidance.log_ratio(x - eps * v, sigma)) / (2 * eps)
        analytic = (c * v).flatten(1).sum(dim=1) / -(sigma ** 2)
        assert torch.allclose(fd, analytic, rtol=1e-5, atol=1e-8)

def test_guidance_is_off_outside_the_time_window_per_sample():
    classifier, disc = tiny_pair(dtype=torch.float64)
    guidance = dg.DiscriminatorGuidance(classifier, disc, img_resolution=8, time_min=0.2, time_max=0.6)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sigma = dg.vp_marginal(torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64))
    sigma = sigma[1] / sigma[0] # EDM sigma of VP times 0.1, 0.4, 0.8.
    c, log_r = guidance.correction(x, sigma)
    assert c[0].abs().max() == 0 and c[2].abs().max() == 0 and c[1].abs().max() > 0
    assert torch.isinf(log_r[[0, 2]]).all() and torch.isfinite(log_r[1])
    alone, _ = guidance.correction(x[1:2], sigma[1:2]) # Same term whatever else is in the batch.
    assert torch.allclose(alone[0], c[1])

def test_log_ratio_is_clamped_like_dgs_clip_of_the_discriminator_output():
    classifier, disc = tiny_pair(dtype=torch.float64)
    with torch.no_grad():
        disc.out[2].c_proj.bias.fill_(100.0)
    guidance = dg.DiscriminatorGuidance(classifier, disc, img_resolution=8, time_min=0, time_max=1)
    c, log_r = guidance.correction(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(log_r, torch.full_like(log_r, np.log((1 - 1e-5) / 1e-5)))
    assert c.abs().max() == 0 # Saturated: no gradient, as in DG.

#----------------------------------------------------------------------------
# Guidance as a part of the one sampler.

def test_zero_weight_leaves_the_sampler_bit_identical():
    net = make_tiny_net()
    classifier, disc = tiny_pair()
    guidance = dg.DiscriminatorGuidance(classifier, disc, img_resolution=8)
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = sampler.edm_sampler(net, latents, num_steps=5)
    denoise = sampler.network_denoiser(net)
    assert dg.with_discriminator_guidance(denoise, guidance, weight_1st_order=0) is denoise
    same = sampler.edm_sampler(net, latents, num_steps=5, denoise=dg.with_discriminator_guidance(denoise, guidance, weight_1st_order=0))
    assert torch.equal(same, plain)
    guided = sampler.edm_sampler(net, latents, num_steps=5, denoise=dg.with_discriminator_guidance(denoise, guidance, weight_1st_order=1.0))
    assert not torch.equal(guided, plain)

def test_only_the_euler_evaluation_is_guided_and_the_term_enters_the_ode_direction():
    net = make_tiny_net()
    classifier, disc = tiny_pair()
    guidance = dg.DiscriminatorGuidance(classifier, disc, img_resolution=8, time_min=0, time_max=1)
    calls = []
    def denoise(x, sigma, step):
        calls.append(step)
        return net(x, sigma).to(torch.float64)
    scaled = epsilon_scaling.with_epsilon_scaling(denoise, eps_scaler=1.01)
    w = 1.5
    guided = dg.with_discriminator_guidance(scaled, guidance, weight_1st_order=w)
    assert guided.second_order is scaled.second_order # The unguided 2nd-order evaluation of what it wraps.
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t_steps = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    result = sampler.sample(guided, latents, t_steps, solver='heun')
    # SEDM-G++'s step by hand: epsilon-scaled Euler direction plus w * c / sigma; the correction unguided.
    x0 = latents.to(torch.float64) * 2.0
    c, _ = guidance.correction(x0, t_steps[0])
    d0 = (x0 - scaled(x0, t_steps[0], 0)) / 2.0 + w * c / 2.0
    x1 = x0 - d0
    d1 = (x1 - scaled(x1, t_steps[1], 0)) / 1.0
    x1 = x0 - (0.5 * d0 + 0.5 * d1)
    c1, _ = guidance.correction(x1, t_steps[1])
    d_last = (x1 - scaled(x1, t_steps[1], 1)) / 1.0 + w * c1 / 1.0
    assert torch.allclose(result, x1 - d_last, rtol=1e-6, atol=1e-6)

def test_boosting_doubles_the_weight_of_unrealistic_samples_on_even_steps():
    boosting = dg.Boosting()
    log_r = torch.tensor([-1.0, 2.0, float('inf')], dtype=torch.float64)
    assert boosting.weight_factor(0, log_r).tolist() == [2.0, 1.0, 1.0]
    assert boosting.weight_factor(1, log_r).tolist() == [1.0, 1.0, 1.0]
    assert boosting.churn_mask(5).tolist() == [True, False, False]
    assert boosting.churn_mask(3) is None

#----------------------------------------------------------------------------
# The command lines.

def invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args])

def generate_ok(*args):
    result = invoke(generate.main, '--device=cpu', *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def read_npz(folder):
    files = sorted(f for f in os.listdir(folder) if f.startswith('samples_') and f.endswith('.npz'))
    arrays = [np.load(os.path.join(folder, f)) for f in files]
    samples = np.concatenate([a['samples'] for a in arrays])
    labels = np.concatenate([a['label'] for a in arrays]) if 'label' in arrays[0].files else None
    return samples, labels

def test_npz_output_holds_the_png_pixels_and_one_hot_labels(tmp_path, cond_net_pkl):
    generate_ok('--network', cond_net_pkl, '--outdir', tmp_path / 'png', '--seeds=0-5', '--steps=3', '--no-grid')
    generate_ok('--network', cond_net_pkl, '--outdir', tmp_path / 'npz', '--seeds=0-5', '--steps=3', '--batch=4', '--npz')
    assert sorted(os.listdir(tmp_path / 'npz')) == ['samples_000000-000002.npz', 'samples_000003-000005.npz'] # EDM's split of 6 seeds into batches of at most 4.
    samples, labels = read_npz(tmp_path / 'npz')
    pngs = np.stack([generation.load_image(tmp_path / 'png' / f'{seed:06d}.png') for seed in range(6)])
    assert samples.dtype == np.uint8 and np.array_equal(samples, pngs)
    assert labels.shape == (6, 4) and np.array_equal(labels.sum(axis=1), np.ones(6))

def test_npz_runs_resume_from_the_seeds_their_files_record(tmp_path, cond_net_pkl):
    common = ['--network', cond_net_pkl, '--seeds=0-9', '--steps=3', '--batch=4', '--npz']
    generate_ok(*common, '--outdir', tmp_path / 'fresh')
    generate_ok(*common[:1], cond_net_pkl, '--seeds=0-5', *common[3:], '--outdir', tmp_path / 'resumed') # An interrupted run: seeds 0-5 done.
    first = sorted(os.listdir(tmp_path / 'resumed'))
    os.utime(tmp_path / 'resumed' / first[0], (1, 1)) # A resumed run must leave finished files alone.
    result = generate_ok(*common, '--outdir', tmp_path / 'resumed', '--resume')
    assert 'Resuming: 6 of 10 images already exist' in result.output
    assert os.stat(tmp_path / 'resumed' / first[0]).st_mtime == 1
    fresh, fresh_labels = read_npz(tmp_path / 'fresh')
    resumed, resumed_labels = read_npz(tmp_path / 'resumed')
    assert np.array_equal(resumed, fresh) and np.array_equal(resumed_labels, fresh_labels) # Files sort by seed, so the order matches too.
    seeds = np.concatenate([np.load(tmp_path / 'resumed' / f)['seeds'] for f in sorted(os.listdir(tmp_path / 'resumed'))])
    assert seeds.tolist() == list(range(10))
    result = generate_ok(*common, '--outdir', tmp_path / 'resumed', '--resume')
    assert 'Resuming: 10 of 10 images already exist' in result.output

def test_npz_resume_refuses_files_that_do_not_record_their_seeds(tmp_path, cond_net_pkl):
    (tmp_path / 'out').mkdir()
    np.savez(tmp_path / 'out' / 'samples_000000-000003.npz', samples=np.zeros([4, 8, 8, 3], np.uint8))
    result = invoke(generate.main, '--device=cpu', '--network', cond_net_pkl, '--outdir', tmp_path / 'out', '--seeds=0-5', '--steps=2', '--npz', '--resume')
    assert result.exit_code != 0 and 'does not record its seeds' in result.stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path / 'out') == ['samples_000000-000003.npz']

def test_zero_guidance_weight_on_the_command_line_changes_no_pixel(tmp_path, cond_net_pkl):
    cls_path, disc_path = save_pair(tmp_path)
    common = ['--network', cond_net_pkl, '--seeds=0-3', '--steps=4', '--no-grid']
    generate_ok(*common, '--outdir', tmp_path / 'plain')
    generate_ok(*common, '--outdir', tmp_path / 'zero', '--discriminator_ckpt', disc_path, '--pretrained_classifier_ckpt', cls_path, '--dg_weight_1st_order=0')
    generate_ok(*common, '--outdir', tmp_path / 'guided', '--discriminator_ckpt', disc_path, '--pretrained_classifier_ckpt', cls_path, '--time_min=0', '--dg_weight_1st_order=20')
    for seed in range(4):
        name = f'{seed:06d}.png'
        plain = (tmp_path / 'plain' / name).read_bytes()
        assert (tmp_path / 'zero' / name).read_bytes() == plain
    assert any((tmp_path / 'guided' / f'{s:06d}.png').read_bytes() != (tmp_path / 'plain' / f'{s:06d}.png').read_bytes() for s in range(4))

@pytest.fixture
def bad_guidance_files(tmp_path):
    cls_path, disc_path = save_pair(tmp_path)
    (tmp_path / 'c').mkdir()
    _cond_cls, cond_disc = save_pair(tmp_path / 'c', cond=True)
    broken = dict(torch.load(disc_path))
    del broken['middle_block.1.qkv.bias']
    broken['out.2.c_proj.bias'] = torch.zeros(3)
    torch.save(broken, tmp_path / 'broken.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    return dict(cls=cls_path, disc=disc_path, cond_disc=cond_disc, broken=str(tmp_path / 'broken.pt'), junk=str(tmp_path / 'junk.pt'))

@pytest.mark.parametrize('args,message', [
    (['--dg_weight_1st_order=1.67'], 'need --discriminator_ckpt'),
    (['--discriminator_ckpt={disc}'], 'needs --pretrained_classifier_ckpt'),
    (['--discriminator_ckpt={disc}', '--pretrained_classifier_ckpt={cls}', '--time_min=0.6', '--time_max=0.4'], 'is above --time_max'),
    (['--discriminator_ckpt={disc}', '--pretrained_classifier_ckpt={cls}', '--cond=1', '--net=uncond'], '--cond=1 needs a class-conditional network'),
    (['--discriminator_ckpt={disc}', '--pretrained_classifier_ckpt={cls}', '--cond=1'], 'is an unconditional discriminator'),
    (['--discriminator_ckpt={cond_disc}', '--pretrained_classifier_ckpt={cls}'], 'pass --cond=1'),
    (['--discriminator_ckpt={broken}', '--pretrained_classifier_ckpt={cls}'], 'missing keys: middle_block.1.qkv.bias; wrong shapes: out.2.c_proj.bias is [3], expected [1]'),
    (['--discriminator_ckpt={cls}', '--pretrained_classifier_ckpt={disc}'], 'takes 16-channel input'),
    (['--discriminator_ckpt={junk}', '--pretrained_classifier_ckpt={cls}'], 'is not a readable discriminator state dict'),
    (['--discriminator_ckpt=nowhere.pt', '--pretrained_classifier_ckpt={cls}'], 'discriminator file not found: nowhere.pt'),
    (['--npz', '--subdirs'], '--subdirs and --grid work with PNG output only'),
    (['--discriminator_ckpt={disc}', '--pretrained_classifier_ckpt={cls}', '--boosting=1', '--do_time_shift'], 'which --do_time_shift does not support'),
    (['--boosting=1'], '--boosting is for discriminator guidance; add --discriminator_ckpt'),
])
def test_bad_guidance_input_gets_one_clear_line(tmp_path, bad_guidance_files, cond_net_pkl, uncond_net_pkl, args, message):
    net = uncond_net_pkl if '--net=uncond' in args else cond_net_pkl
    args = [a.format(**bad_guidance_files) for a in args if a != '--net=uncond']
    out = tmp_path / 'out'
    result = invoke(generate.main, '--device=cpu', f'--network={net}', f'--outdir={out}', '--seeds=0-1', '--steps=2', *args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert not out.exists()

#----------------------------------------------------------------------------
# End to end on CPU: classifier, samples, discriminator, guided sampling with epsilon scaling.

def write_labelled_folder(folder, images, labels):
    write_image_folder(folder, images)
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[f'{i:06d}.png', int(label)] for i, label in enumerate(labels)]}, f)
    return str(folder)

def test_tiny_end_to_end_run(tmp_path, uncond_net_pkl):
    real = write_image_folder(tmp_path / 'real', random_images(48, resolution=8, seed=5))
    result = invoke(train_classifier.main, '--data', real, '--outdir', tmp_path / 'cls', '--epochs=1', '--batch=16', '--width=16', '--depth=1', '--device=cpu')
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'learning rotation' in result.output and os.path.isfile(tmp_path / 'cls' / 'classifier_1.pt')
    cls_path = str(tmp_path / 'cls' / 'classifier_1.pt')

    generate_ok('--network', uncond_net_pkl, '--outdir', tmp_path / 'fake', '--seeds=0-47', '--steps=3', '--npz')
    result = invoke(train_discriminator.main, '--real', real, '--fake', tmp_path / 'fake', '--outdir', tmp_path / 'disc',
        '--pretrained_classifier_ckpt', cls_path, '--epochs=1', '--batch=16', '--width=16', '--depth=1', '--device=cpu')
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'Training on 48 real and 48 generated images' in result.output
    assert sorted(os.listdir(tmp_path / 'disc')) == ['discriminator_1.pt']

    guided_args = ['--network', uncond_net_pkl, '--seeds=0-7', '--steps=3', '--npz', '--pretrained_classifier_ckpt', cls_path,
        '--discriminator_ckpt', tmp_path / 'disc' / 'discriminator_1.pt', '--eps_scaler=1.004', '--time_min=0']
    generate_ok(*guided_args, '--outdir', tmp_path / 'guided', '--dg_weight_1st_order=50')
    generate_ok(*guided_args, '--outdir', tmp_path / 'unguided', '--dg_weight_1st_order=0')
    guided, _ = read_npz(tmp_path / 'guided')
    unguided, _ = read_npz(tmp_path / 'unguided')
    assert guided.shape == (8, 8, 8, 3) and not np.array_equal(guided, unguided)

@pytest.mark.slow
def test_class_conditional_discriminator_from_labelled_real_and_npz_samples(tmp_path, cond_net_pkl):
    real = write_labelled_folder(tmp_path / 'real', random_images(32, resolution=8, seed=6), np.arange(32) % 4)
    cls_path, _ = save_pair(tmp_path)
    generate_ok('--network', cond_net_pkl, '--outdir', tmp_path / 'fake', '--seeds=0-31', '--steps=3', '--npz')
    result = invoke(train_discriminator.main, '--real', real, '--fake', tmp_path / 'fake', '--outdir', tmp_path / 'disc', '--cond=1',
        '--pretrained_classifier_ckpt', cls_path, '--epochs=2', '--batch=16', '--width=16', '--depth=1', '--device=cpu')
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert sorted(os.listdir(tmp_path / 'disc')) == ['discriminator_1.pt', 'discriminator_2.pt']
    generate_ok('--network', cond_net_pkl, '--outdir', tmp_path / 'guided', '--seeds=0-3', '--steps=3', '--cond=1', '--kappa=0.001',
        '--pretrained_classifier_ckpt', cls_path, '--discriminator_ckpt', tmp_path / 'disc' / 'discriminator_2.pt', '--boosting=1')
    assert len([f for f in os.listdir(tmp_path / 'guided') if f.endswith('.png')]) == 4 # Four seeds; the grid goes beside them.
    unlabelled = write_image_folder(tmp_path / 'unlabelled', random_images(8, resolution=8))
    result = invoke(train_discriminator.main, '--real', unlabelled, '--fake', tmp_path / 'fake', '--outdir', tmp_path / 'nope', '--cond=1',
        '--pretrained_classifier_ckpt', cls_path, '--device=cpu')
    assert result.exit_code != 0 and 'Error: ' in result.output and '--cond=1 needs labels' in result.output
    assert not (tmp_path / 'nope').exists()

@pytest.mark.parametrize('bias,changes', [(-100.0, True), (100.0, False)])
def test_boosting_adds_churn_only_to_samples_the_discriminator_rejects(bias, changes):
    # A saturated discriminator: log r is clamped, so its gradient (the guidance term) is zero and
    # only boosting's churn at step 5 can change the result, and only where log r < 0.
    net = make_tiny_net()
    classifier, disc = tiny_pair()
    with torch.no_grad():
        disc.out[2].c_proj.bias.fill_(bias)
    guidance = dg.DiscriminatorGuidance(classifier, disc, img_resolution=8, time_min=0, time_max=1)
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = lambda: sampler.StackedRandomGenerator('cpu', [0, 1, 2, 3]).randn_like
    plain = sampler.edm_sampler(net, latents, num_steps=7, randn_like=noise())
    denoise = dg.with_discriminator_guidance(sampler.network_denoiser(net), guidance, weight_1st_order=1.0, boosting=dg.Boosting())
    boosted = sampler.edm_sampler(net, latents, num_steps=7, randn_like=noise(), denoise=denoise)
    assert torch.equal(boosted, plain) != changes

@pytest.mark.slow
def test_the_seed_command_on_two_torchrun_ranks_matches_one_process(tmp_path, uncond_net_pkl):
    cls_path, disc_path = save_pair(tmp_path)
    flags = [f'--network={uncond_net_pkl}', '--seeds=0-5', '--batch=2', '--steps=3', f'--discriminator_ckpt={disc_path}',
        f'--pretrained_classifier_ckpt={cls_path}', '--eps_scaler=1.004', '--dg_weight_1st_order=1.67', '--npz']
    generate_ok(*flags, '--outdir', tmp_path / 'single')
    result = run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py',
        '--device=cpu', *flags, f'--outdir={tmp_path / "ranks"}'])
    assert result.returncode == 0, result.stderr
    single, _ = read_npz(tmp_path / 'single')
    ranks, _ = read_npz(tmp_path / 'ranks')
    assert single.shape == (6, 8, 8, 3) and np.array_equal(single, ranks)

@pytest.mark.parametrize('args,message', [
    (['--batch=64'], 'is more than the 16 real and generated images together'),
    (['--pretrained_classifier_ckpt={disc}'], 'takes 16-channel input'),
    (['--fake={big}'], 'they must match'),
    (['--real={tmp}/nowhere'], 'not found'),
])
def test_bad_discriminator_training_input_gets_one_clear_line(tmp_path, args, message):
    cls_path, disc_path = save_pair(tmp_path)
    real = write_image_folder(tmp_path / 'real', random_images(8, resolution=8, seed=1))
    fake = write_image_folder(tmp_path / 'fake', random_images(8, resolution=8, seed=2))
    big = write_image_folder(tmp_path / 'big', random_images(8, resolution=16, seed=3))
    given = dict(real=real, fake=fake, pretrained_classifier_ckpt=cls_path)
    for arg in args:
        name, value = arg[2:].split('=', 1)
        given[name] = value.format(disc=disc_path, big=big, tmp=tmp_path)
    extra = [a for a in args if a.startswith('--batch')]
    result = invoke(train_discriminator.main, *[f'--{k}={v}' for k, v in given.items() if k != 'batch'], *extra,
        f'--outdir={tmp_path / "out"}', '--width=16', '--depth=1', '--device=cpu')
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert not (tmp_path / 'out').exists()

@pytest.mark.slow
def test_the_discriminator_learns_to_tell_real_from_generated_images(tmp_path):
    # Real images have vertical stripes, generated ones horizontal; a few dozen steps separate them.
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(128, 3, 8, 8, generator=gen) * 40
    stripe = torch.zeros(8, 8)
    stripe[:, :4] = 200
    real, fake = (base[:64] + stripe).to(torch.uint8), (base[64:] + stripe.t()).to(torch.uint8)
    classifier, _ = tiny_pair()
    disc, history = guidance_training.train_discriminator(classifier, real, fake, tmp_path / 'disc', epochs=4, batch_size=16, lr=1e-3,
        model_channels=16, num_res_blocks=1, progress=False)
    assert history[0]['loss'] > 0.68 and history[-1]['loss'] < history[0]['loss'] - 0.03
    assert history[-1]['accuracy'] > 0.7
    assert sorted(os.listdir(tmp_path / 'disc')) == [f'discriminator_{epoch}.pt' for epoch in range(1, 5)]
    # The saved head is the trained one, and it rates real images as more likely real at small noise.
    loaded = dg.load_discriminator(str(tmp_path / 'disc' / 'discriminator_4.pt'), classifier, cond=False)
    guidance = dg.DiscriminatorGuidance(classifier, loaded, img_resolution=8)
    sigma = torch.tensor(0.05, dtype=torch.float64)
    real_x, fake_x = (misc.uint8_to_model_range(images).to(torch.float64) for images in (real, fake))
    assert guidance.log_ratio(real_x, sigma).mean() > guidance.log_ratio(fake_x, sigma).mean()

def test_at_64_px_the_networks_see_the_cosine_schedule_time():
    classifier = tiny_encoder(adm_encoder.classifier_kwargs(64, model_channels=16, num_res_blocks=1, num_outputs=4), seed=1)
    disc = tiny_encoder(adm_encoder.discriminator_kwargs(classifier.feature_channels, classifier.feature_resolution,
        model_channels=16, num_res_blocks=1), seed=2)
    guidance = dg.DiscriminatorGuidance(classifier, disc, img_resolution=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor(0.5, dtype=torch.float64)
    t = dg.vp_time_from_sigma(sigma).expand(2)
    x_vp = (dg.vp_marginal(t)[0][:, None, None, None] * x).to(torch.float32)
    by_hand = lambda time: disc(classifier.features(x_vp, time.float()), time.float()).reshape(-1)
    assert torch.allclose(guidance.log_ratio(x, sigma), by_hand(dg.cosine_time_from_linear(t)), atol=1e-6)
    assert not torch.allclose(guidance.log_ratio(x, sigma), by_hand(t), atol=1e-4)

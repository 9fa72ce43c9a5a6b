"""CUDA readiness, checked without a GPU.

- Every random draw takes its generator on the device of the tensor it fills: CUDA refuses a CPU
  generator for a CUDA tensor, but a CPU-only machine never sees the two differ. Here the code runs
  on the `meta` device (shapes without values), which is as foreign to a CPU generator as CUDA is,
  while every random function is wrapped to assert that generator and target device agree.
- The training step reads nothing back to the host (a read stalls the GPU queue every step): on the
  meta device any such read raises, since there are no values to read.
"""

import contextlib

import pytest
import torch

from training.guidance import adm_encoder
from training import augment
from training.guidance import discriminator_guidance as dg
from training.sampling import generation
from training.guidance import guidance_training
from training import loss as loss_lib
from training import networks
from training.sampling import sampler as sampler_lib
from conftest import TINY_SONG

META = torch.device('meta')

#----------------------------------------------------------------------------
# Random functions that check where their generator lives.

class MetaGenerator:
    """Stands in for a generator on the meta device, which torch cannot create."""
    device = META
    def manual_seed(self, seed):
        return self
    def seed(self):
        return 0

_RealGenerator = torch.Generator

class _GeneratorType(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, (_RealGenerator, MetaGenerator))

class GeneratorOnAnyDevice(metaclass=_GeneratorType):
    def __new__(cls, device='cpu'):
        return MetaGenerator() if torch.device(device).type == 'meta' else _RealGenerator(device)

def _same_device(a, b):
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)

FACTORIES = ['randn', 'rand', 'randint', 'randperm', 'normal']    # Target: device=, out=, or the default device.
LIKE = ['randn_like', 'rand_like', 'randint_like', 'multinomial', 'bernoulli', 'poisson'] # Target: the input tensor.
IN_PLACE = ['normal_', 'uniform_', 'random_', 'bernoulli_', 'exponential_', 'geometric_', 'cauchy_', 'log_normal_']

def _checked(fn, target_device, name):
    def wrapped(*args, generator=None, **kwargs):
        target = target_device(args, kwargs)
        if generator is not None:
            assert _same_device(generator.device, target), f'torch.{name} fills a {target} tensor from a {generator.device} generator'
            if isinstance(generator, MetaGenerator):
                generator = None
        return fn(*args, generator=generator, **kwargs) if generator is not None else fn(*args, **kwargs)
    return wrapped

def _factory_target(args, kwargs):
    if kwargs.get('device') is not None:
        return kwargs['device']
    if kwargs.get('out') is not None:
        return kwargs['out'].device
    tensors = [a for a in args if isinstance(a, torch.Tensor)] # torch.normal(mean, std) takes its device from them.
    return tensors[0].device if tensors else torch.get_default_device()

def _like_target(args, kwargs):
    return kwargs['device'] if kwargs.get('device') is not None else (args[0] if args else kwargs['input']).device

@pytest.fixture
def strict_generators(monkeypatch):
    """Random functions assert that their generator is on the target's device; torch.Generator('meta') works."""
    for name in FACTORIES:
        monkeypatch.setattr(torch, name, _checked(getattr(torch, name), _factory_target, name))
    for name in LIKE:
        monkeypatch.setattr(torch, name, _checked(getattr(torch, name), _like_target, name))
    for name in IN_PLACE:
        monkeypatch.setattr(torch.Tensor, name, _checked(getattr(torch.Tensor, name), lambda args, kwargs: args[0].device, name))
    monkeypatch.setattr(torch, 'Generator', GeneratorOnAnyDevice)

@pytest.fixture
def host_reads(monkeypatch):
    """Reading a meta tensor back to the host gives zeros instead of raising; counts the reads."""
    reads = []
    def patch(name, fake):
        original = getattr(torch.Tensor, name)
        def read(self, *args, **kwargs):
            if not self.is_meta:
                return original(self, *args, **kwargs)
            reads.append(name)
            return fake(self)
        monkeypatch.setattr(torch.Tensor, name, read)
    zeros = lambda t: torch.zeros(t.shape, dtype=t.dtype)
    patch('item', lambda t: zeros(t).item())
    patch('tolist', lambda t: zeros(t).tolist())
    patch('__float__', lambda t: 0.0)
    patch('__bool__', lambda t: False)
    patch('cpu', zeros)
    return reads

#----------------------------------------------------------------------------
# Random draws: generator and target on the same device.

def test_the_check_itself_catches_a_cpu_generator_filling_a_foreign_tensor(strict_generators):
    with pytest.raises(AssertionError, match='from a cpu generator'):
        torch.randn([2], generator=torch.Generator().manual_seed(0), device=META)
    with pytest.raises(AssertionError, match='from a cpu generator'):
        torch.empty([2], device=META).normal_(generator=torch.Generator())
    torch.randn([2], generator=torch.Generator(META), device=META) # The right pairing passes.

def test_diffusion_draws_its_noise_on_the_images_device(strict_generators):
    images = torch.zeros([2, 3, 8, 8], device=META)
    t = dg.sample_importance_time(2, generator=torch.Generator(META), device=META)
    assert t.device == META
    assert dg.diffuse(images, t, generator=torch.Generator(META)).device == META

def tiny_classifier(resolution=8):
    torch.manual_seed(0)
    return adm_encoder.EncoderUNet(**adm_encoder.classifier_kwargs(resolution, model_channels=16, num_res_blocks=1, num_outputs=4))

def random_uint8(num, resolution=8, seed=0):
    return torch.randint(0, 256, [num, 3, resolution, resolution], generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)

@pytest.fixture
def no_checkpoints(monkeypatch):
    monkeypatch.setattr(guidance_training, 'save_state_dict', lambda path, module: None)

@pytest.mark.slow
def test_the_discriminator_trainer_draws_on_its_device(strict_generators, host_reads, no_checkpoints, tmp_path):
    guidance_training.train_discriminator(tiny_classifier(), random_uint8(16), random_uint8(16, seed=1), tmp_path, epochs=2, batch_size=8,
        model_channels=16, num_res_blocks=1, device=META, progress=False)

def test_the_classifier_trainer_draws_on_its_device(strict_generators, host_reads, no_checkpoints, tmp_path):
    for labels in [None, torch.arange(16) % 3]: # The rotation task draws too.
        guidance_training.train_classifier(random_uint8(16), tmp_path, labels=labels, epochs=1, batch_size=8, model_channels=16,
            num_res_blocks=1, device=META, progress=False)

def tiny_net(precond='EDMPrecond', label_dim=0):
    torch.manual_seed(0)
    return getattr(networks, precond)(img_resolution=8, img_channels=3, label_dim=label_dim, **TINY_SONG)

def test_the_sampler_draws_every_seeds_noise_on_its_device(strict_generators, host_reads):
    net = tiny_net(label_dim=4).to(META)
    kwargs = dict(num_steps=3, S_churn=10) # Churn draws noise inside the loop too.
    for sampler_kwargs in [kwargs, dict(kwargs, solver='euler', discretization='vp')]:
        batches = list(generation.generate_images(net, [0, 1, 2], max_batch_size=2, device=META, sampler_kwargs=sampler_kwargs))
        assert [b.seeds for b in batches] == [[0, 1], [2]]

#----------------------------------------------------------------------------
# The training step reads nothing back to the host.

EDM_AUGMENT = dict(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

@pytest.mark.parametrize('loss_kwargs', [dict(class_name='VPLoss'), dict(class_name='VELoss'), dict(class_name='EDMLoss'),
    dict(class_name='MartingaleLoss', num_steps=3)])
def test_the_training_step_with_augmentation_runs_without_host_reads(strict_generators, loss_kwargs):
    precond = dict(VPLoss='VPPrecond', VELoss='VEPrecond').get(loss_kwargs['class_name'], 'EDMPrecond')
    net = networks.__dict__[precond](img_resolution=8, img_channels=3, label_dim=4, augment_dim=9, **TINY_SONG).to(META).train()
    loss_fn = getattr(loss_lib, loss_kwargs.pop('class_name'))(**loss_kwargs)
    images = torch.zeros([4, 3, 8, 8], device=META)
    labels = torch.zeros([4, 4], device=META)
    loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=augment.AugmentPipe(**EDM_AUGMENT))
    loss.sum().backward() # Meta tensors raise on any read, so reaching here means the step never synchronized.
    assert loss.shape == images.shape

@pytest.mark.slow
def test_the_guidance_trainers_read_losses_once_per_epoch_not_per_step(strict_generators, host_reads, no_checkpoints, tmp_path):
    def reads_for(num_images):
        before = len(host_reads)
        guidance_training.train_discriminator(tiny_classifier(), random_uint8(num_images), random_uint8(num_images, seed=1), tmp_path,
            epochs=1, batch_size=4, model_channels=16, num_res_blocks=1, device=META, progress=False)
        return len(host_reads) - before
    assert reads_for(4) == reads_for(16) # 2 batches vs 8 batches: as many reads.

#----------------------------------------------------------------------------

def test_short_batches_are_padded_on_the_cpu_only():
    assert generation.min_eval_batch('cpu') >= 16
    assert generation.min_eval_batch('cuda') == 1 and generation.min_eval_batch(META) == 1

#----------------------------------------------------------------------------
# The guidance trainers are single-process: under torchrun with several ranks they say so at once.

@pytest.mark.parametrize('script, args', [('train_discriminator', ['--real=r', '--fake=f', '--pretrained_classifier_ckpt=c.pt']),
    ('train_classifier', ['--data=d'])])
def test_the_guidance_trainers_refuse_several_torchrun_ranks_in_one_line(tmp_path, script, args):
    import importlib
    from click.testing import CliRunner
    module = importlib.import_module(script)
    result = CliRunner().invoke(module.main, [*args, f'--outdir={tmp_path / "out"}'], env=dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0'))
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(error_lines) == 1 and 'not torchrun with 2 processes' in error_lines[0], result.output
    assert not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------
# Downloads: once per machine, on local rank 0, while the other ranks wait.

DOWNLOAD_SCRIPT = '''
import json, os, sys, time
sys.path.insert(0, {repo!r})
import dnnlib
from torch_utils import distributed as dist
dist.init('cpu')
opened = []
marker = {out!r} + '/downloaded'
def slow_open_url(url, **kwargs):
    opened.append(url)
    time.sleep(1.5) # Long enough that a rank which did not wait would return before the file exists.
    open(marker, 'w').close()
    return '/cache/file'
dnnlib.util.open_url = slow_open_url
dist.download_first_on_rank0('https://example.com/network.pkl', '/a/local/path.pkl', None)
downloaded_on_return = os.path.exists(marker)
dist.download_first_on_rank0('/only/local/paths.zip') # Nothing to fetch: no wait at all.
json.dump(dict(opened=opened, downloaded_on_return=downloaded_on_return), open({out!r} + '/rank%d.json' % dist.get_rank(), 'w'))
'''

@pytest.mark.slow
def test_downloads_happen_on_rank_0_while_the_others_wait(tmp_path):
    import json
    import sys
    from conftest import REPO, run_cli
    script = tmp_path / 'download.py'
    script.write_text(DOWNLOAD_SCRIPT.format(repo=REPO, out=str(tmp_path)))
    result = run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.load(open(tmp_path / f'rank{r}.json')) for r in range(2))
    assert rank0['opened'] == ['https://example.com/network.pkl'] and rank1['opened'] == []
    assert rank1['downloaded_on_return'] # Rank 1 went on only after rank 0's download had finished.

#----------------------------------------------------------------------------
# benchmarks/gpu_check.py on a machine without CUDA: one line, no work.

@pytest.mark.slow
def test_the_gpu_check_without_cuda_stops_with_one_line(tmp_path):
    import sys
    from conftest import REPO, run_cli
    result = run_cli([sys.executable, 'benchmarks/gpu_check.py', f'--workdir={tmp_path / "work"}'], env=dict(CUDA_VISIBLE_DEVICES=''))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and 'no CUDA GPU' in lines[0], result.stdout + result.stderr
    assert not (tmp_path / 'work').exists()

#----------------------------------------------------------------------------

"""Bad input to every CLI is answered in one line, with a non-zero exit, before anything is written;
and no data file (reference statistics, CIFAR tarball, training state) can make the tools run code.

Each row of the table is a claim: this command, given this bad input (built here), fails with this
message, prints exactly one error line, no traceback, and leaves no new file behind.
"""

import gzip
import io
import json
import os
import pickle
import re
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import eps_norm
import fid
import generate
import jacobian
import sscd
import study
import train
import trainMoLRG
import train_classifier
import train_detector
import train_discriminator
from conftest import make_tiny_net, run_cli, save_tiny_snapshot
from tiny_models import TinyInception, TinySSCD, random_images, save_torchscript, write_image_folder
from training import checkpoint
from training import cli_checks
from training.evaluation import frechet
from training import training_loop

CLIS = {
    'generate': generate.main, 'train': train.main, 'fid': fid.main, 'dataset_tool': dataset_tool.main, 'study': study.main,
    'sscd': sscd.main, 'jacobian': jacobian.main, 'eps_norm': eps_norm.main, 'trainMoLRG': trainMoLRG.main,
    'train_classifier': train_classifier.main, 'train_discriminator': train_discriminator.main, 'train_detector': train_detector.main,
}
HAS_CUDA = torch.cuda.is_available()

#----------------------------------------------------------------------------
# Inputs: good files to combine with one bad one, and files of every wrong kind.

class MakeMarker:
    """A pickle payload that, if it were ever unpickled, would create a marker file."""
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (open, (self.path, 'w'))

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp('fuzz')
    e = dict(root=root)
    e['net'] = save_tiny_snapshot(root / 'net.pkl', make_tiny_net(label_dim=4))
    images = random_images(16, seed=3)
    e['data'] = write_image_folder(root / 'data', images)
    (root / 'data' / 'dataset.json').write_text(json.dumps({'labels': [[f'{i:06d}.png', i % 4] for i in range(16)]}))
    e['unlabelled'] = write_image_folder(root / 'unlabelled', images)
    e['detector'] = save_torchscript(TinyInception(), root / 'detector.pt')
    e['sscd_model'] = save_torchscript(TinySSCD(), root / 'sscd.pt')
    mu, sigma = np.zeros(16), np.eye(16)
    e['ref'] = str(root / 'ref.npz')
    frechet.save_stats(e['ref'], mu, sigma, detector=e['detector'])
    e['features'] = str(root / 'features.npz')
    np.savez(e['features'], features=np.random.RandomState(0).standard_normal([5, 24]).astype(np.float32))
    # Files of the wrong kind, each named by what file_kind() calls it.
    kinds = root / 'kinds'
    kinds.mkdir()
    with zipfile.ZipFile(kinds / 'archive.zip', 'w') as z:
        z.writestr('readme.txt', 'hello')
    np.savez(kinds / 'arrays.npz', x=np.arange(3))
    np.save(kinds / 'array.npy', np.arange(3))
    torch.save({'weight': torch.zeros(2)}, kinds / 'state.pt')
    (kinds / 'empty.pkl').write_bytes(b'')
    PIL.Image.fromarray(images[0]).save(kinds / 'image.png')
    with gzip.open(kinds / 'data.gz', 'wb') as f:
        f.write(b'x' * 100)
    (kinds / 'folder').mkdir()
    e['kinds'] = {
        'zip file': kinds / 'archive.zip', 'npz file': kinds / 'arrays.npz', 'npy array': kinds / 'array.npy',
        'torch.save file': kinds / 'state.pt', 'TorchScript archive': e['detector'], 'empty file': kinds / 'empty.pkl',
        'PNG image': kinds / 'image.png', 'gzip file': kinds / 'data.gz', 'pickle': e['net'],
    }
    e['folder'] = kinds / 'folder'
    e['text'] = kinds / 'notes.txt'
    e['text'].write_text('not a model\n')
    # Damaged statistics and feature files.
    data = open(e['ref'], 'rb').read()
    (root / 'truncated.npz').write_bytes(data[:len(data) // 2])
    e['truncated_npz'] = root / 'truncated.npz'
    np.savez(root / 'nan-ref.npz', mu=np.full(16, np.nan), sigma=np.eye(16))
    np.savez(root / 'inf-ref.npz', mu=np.zeros(16), sigma=np.full([16, 16], np.inf))
    np.savez(root / 'no-sigma.npz', mu=np.zeros(16))
    np.savez(root / 'bad-shape.npz', mu=np.zeros(16), sigma=np.eye(15))
    np.savez(root / 'object.npz', mu=np.array([{'a': 1}], dtype=object), sigma=np.eye(1))
    np.savez(root / 'other-detector.npz', mu=mu, sigma=sigma, detector=np.array('somebody-elses.pt'), detector_sha256=np.array('0' * 64))
    e.update({name: root / f'{name}.npz' for name in ['nan-ref', 'inf-ref', 'no-sigma', 'bad-shape', 'object', 'other-detector']})
    np.savez(root / 'no-features.npz', other=np.zeros([5, 24]))
    e['no_features'] = root / 'no-features.npz'
    e['a_file'] = root / 'a-file.txt'
    e['a_file'].write_text('I am a file\n')
    return e

#----------------------------------------------------------------------------
# Running a row.

IGNORED_STDERR = ('Usage:', 'Try ', 'Warning: loading') # click's usage lines and the one-line pickle notice.

def files_under(folder):
    return {os.path.join(root, name) for root, dirs, names in os.walk(folder) for name in names + dirs}

def invoke(cli, args):
    return CliRunner().invoke(CLIS[cli], [str(arg) for arg in args])

PROGRESS_BAR = re.compile(r'^\s*\d+%\|') # tqdm's lines, of work done before an error found at the end.

def assert_one_line_error(result, fragment, after_work=False):
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output
    error_lines = [line for line in result.stderr.replace('\r', '\n').splitlines() if line.strip() and not line.startswith(IGNORED_STDERR)
        and not (after_work and PROGRESS_BAR.match(line))]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith('Error: ') and fragment in error_lines[0], error_lines[0]

#----------------------------------------------------------------------------
# The table. Each builder takes (env, tmp_path) and returns (cli, args); `out` is where the command
# would write, which must stay absent.

ROWS = {}

def row(name, fragment, build, marks=()):
    assert name not in ROWS, name
    ROWS[name] = pytest.param(build, fragment, id=name, marks=marks)

def out(t):
    return t / 'out'

# The commands with good inputs, each taking the bad ones as overrides.
def generate_args(e, t, *extra, outdir=None):
    return 'generate', ['--network', e['net'], '--outdir', out(t) if outdir is None else outdir, '--seeds=0-1', '--steps=2', '--device=cpu', *extra]
def train_args(e, t, *extra, outdir=None, data=None):
    return 'train', ['--outdir', out(t) if outdir is None else outdir, '--data', e['data'] if data is None else data, '--cbase=8', '--cres=1,2',
        '--batch=4', '--duration=0.000004', '--device=cpu', '--workers=0', '--dry-run', *extra]
def calc_args(e, t, *extra, ref=None):
    return 'fid', ['calc', '--images', e['data'], '--ref', e['ref'] if ref is None else ref, '--num=16', '--detector', e['detector'], '--device=cpu', '--workers=0', *extra]
def ref_args(e, t, *extra, dest=None, detector=None):
    return 'fid', ['ref', '--data', e['data'], '--dest', out(t) / 'ref.npz' if dest is None else dest,
        '--detector', e['detector'] if detector is None else detector, '--device=cpu', '--workers=0', *extra]
def tool_args(e, t, *extra, source=None, dest=None):
    return 'dataset_tool', ['--source', e['data'] if source is None else source, '--dest', out(t) / 'd.zip' if dest is None else dest, *extra]
def study_args(e, t, *extra, outdir=None, ref=None):
    return 'study', ['--network', e['net'], '--data', e['data'], '--ref', e['ref'] if ref is None else ref, '--detector', e['detector'],
        '--outdir', out(t) if outdir is None else outdir, '--num=4', '--num_calibration=4', '--rounds=1', '--device=cpu', *extra]
def feature_args(e, t, *extra, features=None, model=None):
    return 'sscd', ['feature', '--images', e['data'], '--features', out(t) / 'f.npz' if features is None else features,
        '--model', e['sscd_model'] if model is None else model, '--device=cpu', '--workers=0', *extra]
def score_args(e, t, command, source=None, target=None, *extra):
    return 'sscd', [command, '--source', e['features'] if source is None else source, '--target', e['features'] if target is None else target, *extra]
def jacobian_args(e, t, *extra, outdir=None):
    return 'jacobian', ['--network', e['net'], '--outdir', out(t) if outdir is None else outdir, '--steps=2', '--device=cpu', '--fast', *extra]
def eps_norm_args(e, t, *extra, outdir=None):
    return 'eps_norm', ['--network', e['net'], '--data', e['data'], '--outdir', out(t) if outdir is None else outdir, '--num=4', '--steps=2', '--device=cpu', *extra]
def molrg_args(e, t, *extra, outdir=None, path=None):
    return 'trainMoLRG', ['--outdir', out(t) if outdir is None else outdir, '--path', t / 'datasets' if path is None else path, '--img_res=2',
        '--class_num=2', '--per_class_dim=2', '--sample_per_class=4', '--embed_channels=8', '--device=cpu', '--dry-run', *extra]
def classifier_args(e, t, *extra, outdir=None, data=None):
    return 'train_classifier', ['--data', e['data'] if data is None else data, '--outdir', out(t) if outdir is None else outdir, '--epochs=1',
        '--width=8', '--device=cpu', *extra]
def discriminator_args(e, t, *extra, outdir=None, classifier=None, real=None):
    return 'train_discriminator', ['--real', e['data'] if real is None else real, '--fake', e['data'], '--outdir', out(t) if outdir is None else outdir,
        '--pretrained_classifier_ckpt', e['kinds']['torch.save file'] if classifier is None else classifier, '--epochs=1', '--device=cpu', *extra]
def detector_args(e, t, *extra, dest=None, data=None):
    return 'train_detector', ['--data', e['data'] if data is None else data, '--dest', out(t) / 'd.pt' if dest is None else dest, '--epochs=1', *extra]

FOLDER_OUTPUTS = { # CLI: builder taking the output folder.
    'generate': lambda e, t, o: generate_args(e, t, outdir=o), 'train': lambda e, t, o: train_args(e, t, outdir=o),
    'study': lambda e, t, o: study_args(e, t, outdir=o), 'jacobian': lambda e, t, o: jacobian_args(e, t, outdir=o),
    'eps_norm': lambda e, t, o: eps_norm_args(e, t, outdir=o), 'trainMoLRG': lambda e, t, o: molrg_args(e, t, outdir=o),
    'trainMoLRG --path': lambda e, t, o: molrg_args(e, t, path=o), 'train_classifier': lambda e, t, o: classifier_args(e, t, outdir=o),
    'train_discriminator': lambda e, t, o: discriminator_args(e, t, outdir=o), 'dataset_tool folder': lambda e, t, o: tool_args(e, t, dest=o),
}
FILE_OUTPUTS = { # CLI: builder taking the output file.
    'fid ref': lambda e, t, o: ref_args(e, t, dest=o), 'dataset_tool zip': lambda e, t, o: tool_args(e, t, dest=o),
    'sscd feature': lambda e, t, o: feature_args(e, t, features=o), 'train_detector': lambda e, t, o: detector_args(e, t, dest=o),
}

# Output locations that cannot be used.
for cli, build in FOLDER_OUTPUTS.items():
    row(f'{cli}: output folder is a file', 'is a file, not a folder', lambda e, t, b=build: b(e, t, e['a_file']))
    row(f'{cli}: output folder inside a file', 'cannot be created', lambda e, t, b=build: b(e, t, e['a_file'] / 'sub'))
    row(f'{cli}: empty output folder', 'is empty', lambda e, t, b=build: b(e, t, ''))
    row(f'{cli}: read-only output folder', 'not writable', lambda e, t, b=build: b(e, t, read_only(t) / 'sub'),
        marks=pytest.mark.skipif(os.geteuid() == 0, reason='root writes anywhere'))
for cli, build in FILE_OUTPUTS.items():
    suffix = '.zip' if 'zip' in cli else ''
    row(f'{cli}: output file inside a file', 'cannot be created', lambda e, t, b=build, s=suffix: b(e, t, e['a_file'] / f'x{s}'))
    row(f'{cli}: empty output file', 'is empty', lambda e, t, b=build: b(e, t, ''))
    row(f'{cli}: read-only output folder', 'not writable', lambda e, t, b=build, s=suffix: b(e, t, read_only(t) / f'x{s}'),
        marks=pytest.mark.skipif(os.geteuid() == 0, reason='root writes anywhere'))
for cli, build in FILE_OUTPUTS.items():
    if 'dataset_tool' not in cli: # A folder --dest is dataset_tool's other output format.
        row(f'{cli}: output file is a folder', 'is a folder', lambda e, t, b=build: b(e, t, e['folder']))

def read_only(t):
    folder = t / 'read-only'
    folder.mkdir(exist_ok=True)
    folder.chmod(0o500)
    return folder

# --device=cuda on a machine without a GPU.
DEVICE_CLIS = {
    'generate': generate_args, 'train': train_args, 'fid calc': calc_args, 'fid ref': ref_args, 'study': study_args,
    'sscd feature': feature_args, 'jacobian': jacobian_args, 'eps_norm': eps_norm_args, 'trainMoLRG': molrg_args,
    'train_classifier': classifier_args, 'train_discriminator': discriminator_args,
}
for cli, build in DEVICE_CLIS.items():
    row(f'{cli}: --device=cuda without a GPU', 'no CUDA GPU is available', lambda e, t, b=build: b(e, t, '--device=cuda'),
        marks=pytest.mark.skipif(HAS_CUDA, reason='this machine has a GPU'))

# Wrong-kind files where a network pickle, a state dict or a module is expected.
NETWORK_OPTIONS = {
    'generate --network': lambda e, t, f: generate_args(e, t, '--network', f), 'jacobian --network': lambda e, t, f: jacobian_args(e, t, '--network', f),
    'eps_norm --network': lambda e, t, f: eps_norm_args(e, t, '--network', f), 'study --network': lambda e, t, f: study_args(e, t, '--network', f),
    'train --transfer': lambda e, t, f: train_args(e, t, '--transfer', f),
}
for option, build in NETWORK_OPTIONS.items():
    for kind in ['zip file', 'npz file', 'npy array', 'TorchScript archive', 'empty file', 'PNG image', 'gzip file']:
        row(f'{option}: {kind}', f'is {cli_checks.with_article(kind)}, expected a pickle or torch.save file', lambda e, t, b=build, k=kind: b(e, t, e['kinds'][k]))
    row(f'{option}: torch.save file of other data', 'not a weights-only network of this codebase', lambda e, t, b=build: b(e, t, e['kinds']['torch.save file']))
    row(f'{option}: missing file', 'not found', lambda e, t, b=build: b(e, t, t / 'missing.pkl'))
    row(f'{option}: text file', 'not a readable network pickle', lambda e, t, b=build: b(e, t, e['text']))
MODULE_OPTIONS = {
    'fid calc --detector': lambda e, t, f: calc_args(e, t, '--detector', f), 'fid ref --detector': lambda e, t, f: ref_args(e, t, detector=f),
    'study --detector': lambda e, t, f: study_args(e, t, '--detector', f), 'sscd feature --model': lambda e, t, f: feature_args(e, t, model=f),
}
for option, build in MODULE_OPTIONS.items():
    for kind in ['zip file', 'npz file', 'torch.save file', 'empty file', 'PNG image']:
        row(f'{option}: {kind}', f'is {cli_checks.with_article(kind)}, expected a TorchScript archive or pickle', lambda e, t, b=build, k=kind: b(e, t, e['kinds'][k]))
    row(f'{option}: text file', 'neither a TorchScript archive nor a pickled torch module', lambda e, t, b=build: b(e, t, e['text']))
STATE_DICT_OPTIONS = {
    'generate --discriminator_ckpt': lambda e, t, f: generate_args(e, t, '--discriminator_ckpt', f, '--pretrained_classifier_ckpt', e['kinds']['torch.save file']),
    'generate --pretrained_classifier_ckpt': lambda e, t, f: generate_args(e, t, '--discriminator_ckpt', e['kinds']['torch.save file'], '--pretrained_classifier_ckpt', f),
    'generate --molrg': lambda e, t, f: generate_args(e, t, '--molrg', f),
    'train_discriminator --pretrained_classifier_ckpt': lambda e, t, f: discriminator_args(e, t, classifier=f),
    'jacobian --molrg': lambda e, t, f: jacobian_args(e, t, '--molrg', f),
}
for option, build in STATE_DICT_OPTIONS.items():
    for kind in ['zip file', 'npz file', 'TorchScript archive', 'PNG image']:
        row(f'{option}: {kind}', f'is {cli_checks.with_article(kind)}, expected a torch.save file or pickle', lambda e, t, b=build, k=kind: b(e, t, e['kinds'][k]))

# Truncated, damaged or wrong statistics and feature files.
REF_OPTIONS = {'fid calc --ref': lambda e, t, f: calc_args(e, t, ref=f), 'study --ref': lambda e, t, f: study_args(e, t, ref=f)}
for option, build in REF_OPTIONS.items():
    row(f'{option}: truncated npz', 'as an .npz file', lambda e, t, b=build: b(e, t, e['truncated_npz']))
    row(f'{option}: text file', 'as an .npz file', lambda e, t, b=build: b(e, t, e['text']))
    row(f'{option}: empty file', 'as an .npz file', lambda e, t, b=build: b(e, t, e['kinds']['empty file']))
    row(f'{option}: single npy array', 'is a single .npy array, not an .npz file', lambda e, t, b=build: b(e, t, e['kinds']['npy array']))
    row(f'{option}: folder', 'is a folder', lambda e, t, b=build: b(e, t, e['folder']))
    row(f'{option}: missing file', 'not found', lambda e, t, b=build: b(e, t, t / 'missing.npz'))
    row(f'{option}: no sigma', 'has no "mu" and "sigma" arrays', lambda e, t, b=build: b(e, t, e['no-sigma']))
    row(f'{option}: object arrays', 'as an .npz file', lambda e, t, b=build: b(e, t, e['object']))
    row(f'{option}: NaN mu', 'NaN or infinite', lambda e, t, b=build: b(e, t, e['nan-ref']))
    row(f'{option}: infinite sigma', 'NaN or infinite', lambda e, t, b=build: b(e, t, e['inf-ref']))
    row(f'{option}: sigma of the wrong shape', 'expected [D] and [D, D]', lambda e, t, b=build: b(e, t, e['bad-shape']))
    row(f'{option}: made with another detector', 'was made with detector somebody-elses.pt', lambda e, t, b=build: b(e, t, e['other-detector']))
for command in ['rpscore', 'mscore']:
    for side in ['source', 'target']:
        pick = lambda f, s=side: dict(source=f) if s == 'source' else dict(target=f)
        row(f'sscd {command} --{side}: truncated npz', 'as an .npz file', lambda e, t, c=command, p=pick: score_args(e, t, c, **p(e['truncated_npz'])))
        row(f'sscd {command} --{side}: text file', 'as an .npz file', lambda e, t, c=command, p=pick: score_args(e, t, c, **p(e['text'])))
        row(f'sscd {command} --{side}: no features', 'has no "features" array', lambda e, t, c=command, p=pick: score_args(e, t, c, **p(e['no_features'])))
        row(f'sscd {command} --{side}: missing', 'not found', lambda e, t, c=command, p=pick: score_args(e, t, c, **p(t / 'missing.npz')))
row('sscd mscore: threshold NaN', '--t', lambda e, t: score_args(e, t, 'mscore', None, None, '--t=nan'))

# Numbers: non-finite, out of order, out of range.
for value in ['nan', 'inf', '-inf']:
    row(f'generate --eps_scaler={value}', 'not a finite number', lambda e, t, v=value: generate_args(e, t, f'--eps_scaler={v}'))
    row(f'generate --kappa={value}', 'not a finite number', lambda e, t, v=value: generate_args(e, t, f'--kappa={v}'))
    row(f'eps_norm --eps_scaler={value}', 'not a finite number', lambda e, t, v=value: eps_norm_args(e, t, f'--eps_scaler={v}'))
    row(f'study --eps_scalers=1,{value}', 'positive eps_scaler', lambda e, t, v=value: study_args(e, t, f'--eps_scalers=1,{v}'))
row('generate --S_noise=nan', 'not a finite number', lambda e, t: generate_args(e, t, '--S_noise=nan'))
row('eps_norm --kappa=nan', 'not a finite number', lambda e, t: eps_norm_args(e, t, '--kappa=nan'))
row('generate --sigma_min above --sigma_max', '--sigma_min=10 is above --sigma_max=1', lambda e, t: generate_args(e, t, '--sigma_min=10', '--sigma_max=1'))
row('generate --S_min above --S_max', '--S_min=5 is above --S_max=1', lambda e, t: generate_args(e, t, '--S_min=5', '--S_max=1'))
row('jacobian --sigma_min above --sigma_max', '--sigma_min=10 is above --sigma_max=1', lambda e, t: jacobian_args(e, t, '--sigma_min=10', '--sigma_max=1'))
row('generate --sigma_min=0', '--sigma_min', lambda e, t: generate_args(e, t, '--sigma_min=0'))
row('generate --seeds backwards', 'is empty', lambda e, t: generate_args(e, t, '--seeds=5-2'))
row('generate --seeds not a number', 'is not a seed', lambda e, t: generate_args(e, t, '--seeds=x'))
row('generate --seeds negative', 'is not a seed', lambda e, t: generate_args(e, t, '--seeds=-3'))
row('generate --seeds too many for memory', 'GiB', lambda e, t: generate_args(e, t, '--seeds=0-99999999999999'))
row('generate --seeds beyond 64 bits', 'too large', lambda e, t: generate_args(e, t, f'--seeds={1 << 64}'))
row('generate --class out of range', 'out of range: the network has 4 classes', lambda e, t: generate_args(e, t, '--class=4'))
row('generate --class negative', '--class', lambda e, t: generate_args(e, t, '--class=-1'))
row('generate --batch=0', '--batch', lambda e, t: generate_args(e, t, '--batch=0'))
row('generate --time_min above --time_max', 'is above --time_max', lambda e, t: generate_args(e, t, '--discriminator_ckpt', e['kinds']['torch.save file'],
    '--pretrained_classifier_ckpt', e['kinds']['torch.save file'], '--time_min=0.9', '--time_max=0.1'))
row('generate --npz with --subdirs', '--npz writes samples_*.npz files', lambda e, t: generate_args(e, t, '--npz', '--subdirs'))
row('jacobian --class out of range', 'out of range', lambda e, t: jacobian_args(e, t, '--class=9'))
row('jacobian --steps=1', '--steps', lambda e, t: jacobian_args(e, t, '--steps=1'))
row('eps_norm --num=1', '--num', lambda e, t: eps_norm_args(e, t, '--num=1'))
row('study --eps_scalers not numbers', 'not a comma-separated list', lambda e, t: study_args(e, t, '--eps_scalers=a,b'))
row('study --eps_scalers negative', 'positive eps_scaler', lambda e, t: study_args(e, t, '--eps_scalers=-1'))
row('study --cutoff out of range', '--cutoff', lambda e, t: study_args(e, t, '--cutoff=2000'))
row('fid calc --num=1', '--num', lambda e, t: calc_args(e, t, '--num=1'))
row('fid calc --num above the images', 'Found 16 images', lambda e, t: calc_args(e, t, '--num=17'))
row('train --duration=0', '--duration', lambda e, t: train_args(e, t, '--duration=0'))
row('train --batch not divisible by --batch-gpu', '--batch', lambda e, t: train_args(e, t, '--batch=0'))
row('train --cres not a list', '--cres', lambda e, t: train_args(e, t, '--cres=a,b'))
row('trainMoLRG: MoLRG dataset beyond memory', 'The MoLRG dataset needs about', lambda e, t: molrg_args(e, t, '--img_res=4096', '--sample_per_class=1000000'))
row('trainMoLRG --img_res=0', '--img_res', lambda e, t: molrg_args(e, t, '--img_res=0'))
row('train_classifier --epochs=0', '--epochs', lambda e, t: classifier_args(e, t, '--epochs=0'))
row('train_classifier --lr=0', '--lr', lambda e, t: classifier_args(e, t, '--lr=0'))
row('train_discriminator --cond=2', '--cond', lambda e, t: discriminator_args(e, t, '--cond=2'))
row('train_detector --holdout=0.9', '--holdout', lambda e, t: detector_args(e, t, '--holdout=0.9'))
row('dataset_tool --resolution beyond memory', 'GiB', lambda e, t: tool_args(e, t, '--resolution=1000000x1000000'))
row('dataset_tool --resolution=0x0', 'is not a size like 64x64', lambda e, t: tool_args(e, t, '--resolution=0x0'))
row('dataset_tool --max-images=0', '--max-images', lambda e, t: tool_args(e, t, '--max-images=0'))

# Data sets and their labels.
def labelled_folder(t, labels, num=4, resolution=8):
    folder = t / 'src'
    write_image_folder(folder, random_images(num, resolution=resolution, seed=5))
    (folder / 'dataset.json').write_text(labels if isinstance(labels, str) else json.dumps({'labels': labels}))
    return folder
NAMES = [f'{i:06d}.png' for i in range(4)]
BAD_LABELS = {
    'string label': ([[n, 'cat'] for n in NAMES], 'labels are class indices'),
    'negative label': ([[n, -1] for n in NAMES], 'labels are class indices'),
    'fractional label': ([[n, 1.5] for n in NAMES], 'labels are class indices'),
    'NaN label': ('{"labels": [["000000.png", NaN], ["000001.png", 1], ["000002.png", 1], ["000003.png", 1]]}', 'labels are class indices'),
    'null label': ([[n, None] for n in NAMES], 'labels are class indices'),
    'boolean label': ([[n, True] for n in NAMES], 'labels are class indices'),
    'label vector with NaN': ('{"labels": [["000000.png", [0.5, NaN]], ["000001.png", [1, 0]], ["000002.png", [1, 0]], ["000003.png", [1, 0]]]}', 'labels are class indices'),
    'partly missing labels': ([[n, 0] for n in NAMES[:3]], 'labels 3 of the 4 images but not 000003.png'),
    'labels not pairs': ([1, 2, 3, 4], 'must be a list of [file name, label] pairs'),
    'not JSON': ('{"labels": [', 'not a JSON object with a "labels" list'),
    'JSON list': ('[1, 2]', 'not a JSON object with a "labels" list'),
}
for name, (labels, fragment) in BAD_LABELS.items():
    row(f'dataset_tool dataset.json: {name}', fragment, lambda e, t, l=labels: tool_args(e, t, source=labelled_folder(t, l)))
row('dataset_tool: missing source', 'not found', lambda e, t: tool_args(e, t, source=t / 'nowhere'))
row('dataset_tool: source is a text file', 'notes.txt', lambda e, t: tool_args(e, t, source=e['text']))
row('dataset_tool: source is an empty folder', 'No image files found', lambda e, t: tool_args(e, t, source=e['folder']))
row('dataset_tool: source zip is damaged', 'zip', lambda e, t: tool_args(e, t, source=damaged_zip(t)))
row('dataset_tool: CIFAR tarball without batches', 'is not the python version of CIFAR-10', lambda e, t: tool_args(e, t, source=cifar_tarball(t, None)))
row('dataset_tool: CIFAR batch of the wrong shape', 'does not hold N 32x32 RGB images', lambda e, t: tool_args(e, t, source=cifar_tarball(t, {'data': np.zeros([2, 5], np.uint8), 'labels': [0, 1]})))
row('dataset_tool: CIFAR batch not a dict', 'not a dict of images and labels', lambda e, t: tool_args(e, t, source=cifar_tarball(t, [1, 2, 3])))
row('dataset_tool: folder dest not empty', 'already has files in it', lambda e, t: tool_args(e, t, dest=e['root'] / 'data'))
row('train --data missing', 'dataset not found', lambda e, t: train_args(e, t, data=t / 'nowhere.zip'))
row('train --data a text file', 'notes.txt', lambda e, t: train_args(e, t, data=e['text']))
row('train --cond without labels', 'label', lambda e, t: train_args(e, t, '--cond=1', data=e['unlabelled']))
row('train_classifier --data missing', 'not found', lambda e, t: classifier_args(e, t, data=t / 'nowhere'))
row('train_classifier --labels=classes without labels', 'label', lambda e, t: classifier_args(e, t, '--labels=classes', data=e['unlabelled']))
row('train_discriminator --real missing', 'not found', lambda e, t: discriminator_args(e, t, real=t / 'nowhere'))
row('train_discriminator --cond=1 without labels', 'label', lambda e, t: discriminator_args(e, t, '--cond=1', real=e['unlabelled']))
row('train_detector --data unlabelled', 'has no labels', lambda e, t: detector_args(e, t, data=e['unlabelled']))
row('train_detector --data missing', 'not found', lambda e, t: detector_args(e, t, data=t / 'nowhere'))
row('fid calc --images missing', 'not found', lambda e, t: ('fid', calc_args(e, t)[1][:1] + ['--images', t / 'nowhere'] + calc_args(e, t)[1][3:]))
row('fid calc --images truncated npz', 'truncated.npz', lambda e, t: ('fid', ['calc', '--images', e['truncated_npz'], '--ref', e['ref'], '--num=2', '--detector', e['detector'], '--device=cpu', '--workers=0']))
row('fid ref --data truncated npz', 'truncated.npz', lambda e, t: ('fid', ['ref', '--data', e['truncated_npz'], '--dest', out(t) / 'r.npz', '--detector', e['detector'], '--device=cpu', '--workers=0']))
row('sscd feature --images truncated npz', 'truncated.npz', lambda e, t: ('sscd', ['feature', '--images', e['truncated_npz'], '--features', out(t) / 'f.npz', '--model', e['sscd_model'], '--device=cpu']))
row('train_discriminator --fake truncated npz', 'truncated.npz', lambda e, t: ('train_discriminator', discriminator_args(e, t)[1][:2] + ['--fake', e['truncated_npz']] + discriminator_args(e, t)[1][4:]))
row('train_classifier --data truncated npz', 'truncated.npz', lambda e, t: classifier_args(e, t, data=e['truncated_npz']))
row('eps_norm --data of another size', '--data has 3x16x16 images', lambda e, t: eps_norm_args(e, t, '--data', labelled_folder(t, [[n, 0] for n in NAMES], resolution=16)))

def damaged_zip(t):
    path = t / 'damaged.zip'
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as z:
        z.writestr('a.png', b'x' * 100)
    path.write_bytes(buffer.getvalue()[:40])
    return path

def cifar_tarball(t, batch, payload=None):
    """cifar-10-python.tar.gz whose batches are `batch` (None: no batches at all), or a raw pickle payload."""
    path = t / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        for index in range(1, 6) if batch is not None or payload is not None else []:
            raw = payload if payload is not None else pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{index}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        if batch is None and payload is None:
            info = tarfile.TarInfo('cifar-10-batches-py/readme.html')
            tar.addfile(info, io.BytesIO(b''))
    return path

def mixed_sizes(t):
    folder = t / 'mixed'
    write_image_folder(folder, random_images(2, resolution=8))
    PIL.Image.fromarray(random_images(1, resolution=12)[0]).save(folder / 'zzz.png')
    return folder

# Training states: damaged by hand, of the wrong kind.
def state_file(t, content=None, raw=None, name='training-state-000000.pt'):
    path = t / 'run' / name
    path.parent.mkdir(exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(content, path)
    return path
row('train --resume truncated state', 'not a readable training state', lambda e, t: train_args(e, t, '--resume', state_file(t, raw=open(state_file(t, {'format': 'x', 'a': torch.zeros(100)}), 'rb').read()[:200])))
row('train --resume text file', 'not a readable training state', lambda e, t: train_args(e, t, '--resume', state_file(t, raw=b'hello, I am not a state\n')))
row('train --resume empty file', 'not a readable training state', lambda e, t: train_args(e, t, '--resume', state_file(t, raw=b'')))
row('train --resume of a list', 'not a training state', lambda e, t: train_args(e, t, '--resume', state_file(t, [1, 2, 3])))
row('train --resume of a state dict', 'not a training state', lambda e, t: train_args(e, t, '--resume', state_file(t, {'weight': torch.zeros(2)})))
row('train --resume our format without entries', 'another configuration', lambda e, t: train_args(e, t, '--resume', state_file(t, {'format': training_loop.STATE_FORMAT, 'fingerprint': {}})))
row('train --resume misnamed file', 'training-state-*.pt', lambda e, t: train_args(e, t, '--resume', state_file(t, {'format': 'x'}, name='state.pt')))
row('train --resume missing', 'training-state-*.pt', lambda e, t: train_args(e, t, '--resume', t / 'training-state-000000.pt'))
row('train --resume and --transfer', 'cannot be specified at the same time', lambda e, t: train_args(e, t, '--transfer', e['net'], '--resume', state_file(t, {'format': 'x'})))

# generate --resume over damaged output.
def corrupt_samples(t):
    folder = out(t)
    folder.mkdir()
    (folder / 'samples_000000-000001.npz').write_bytes(b'PK\x03\x04 damaged')
    return folder
row('generate --npz --resume over a damaged samples file', 'is not a readable .npz file', lambda e, t: generate_args(e, t, '--npz', '--resume', outdir=corrupt_samples(t)))

TABLE = list(ROWS.values())

@pytest.mark.parametrize('build, fragment', TABLE)
def test_bad_input_gets_one_line_and_writes_nothing(env, tmp_path, build, fragment):
    cli, args = build(env, tmp_path)
    before = files_under(tmp_path) | files_under(env['root'])
    result = invoke(cli, args)
    assert_one_line_error(result, fragment)
    assert files_under(tmp_path) | files_under(env['root']) == before

def test_the_table_covers_every_cli_with_enough_rows():
    assert len(TABLE) >= 150
    names = ' '.join(p.id for p in TABLE)
    for cli in ['generate', 'train ', 'fid calc', 'fid ref', 'dataset_tool', 'study', 'sscd', 'jacobian', 'eps_norm', 'trainMoLRG',
            'train_classifier', 'train_discriminator', 'train_detector']:
        assert cli in names, cli

#----------------------------------------------------------------------------
# No data file can run code.

def test_a_reference_whose_detector_field_names_a_malicious_pickle_runs_nothing(env, tmp_path):
    marker = tmp_path / 'marker'
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(MakeMarker(str(marker)), f)
    for recorded in ['evil.pkl', str(tmp_path / 'evil.pkl'), f'file://{tmp_path}/evil.pkl']:
        np.savez(tmp_path / 'ref.npz', mu=np.zeros(16), sigma=np.eye(16), detector=np.array(recorded))
        for cli, args in [calc_args(env, tmp_path, ref=tmp_path / 'ref.npz'), ('fid', ['calc', '--images', env['data'], '--ref', tmp_path / 'ref.npz', '--num=16', '--device=cpu']),
                study_args(env, tmp_path, ref=tmp_path / 'ref.npz'), ('study', [f'--ref={tmp_path / "ref.npz"}', f'--outdir={tmp_path / "out"}', '--device=cpu'])]:
            result = invoke(cli, args)
            assert result.exit_code != 0 and 'Traceback' not in result.output
            assert not marker.exists(), (cli, recorded)

def test_a_crafted_cifar_tarball_runs_nothing(env, tmp_path):
    marker = tmp_path / 'marker'
    source = cifar_tarball(tmp_path, None, payload=pickle.dumps(MakeMarker(str(marker)), protocol=2))
    result = invoke('dataset_tool', ['--source', source, '--dest', tmp_path / 'out.zip'])
    assert_one_line_error(result, 'refusing to load')
    assert not marker.exists() and not (tmp_path / 'out.zip').exists()

def test_a_crafted_training_state_runs_nothing(env, tmp_path):
    marker = tmp_path / 'marker'
    state = state_file(tmp_path, {'format': training_loop.STATE_FORMAT, 'fingerprint': MakeMarker(str(marker))})
    result = invoke(*train_args(env, tmp_path, '--resume', state))
    assert_one_line_error(result, 'holds other objects; refusing to load it')
    assert not marker.exists() and not out(tmp_path).exists()

def test_a_crafted_weights_only_network_runs_nothing(env, tmp_path):
    marker = tmp_path / 'marker'
    torch.save({'format': checkpoint.WEIGHTS_ONLY_FORMAT, 'version': 1, 'class_name': 'EDMPrecond', 'init_kwargs': MakeMarker(str(marker))}, tmp_path / 'evil.pt')
    for cli, args in [generate_args(env, tmp_path, '--network', tmp_path / 'evil.pt'), train_args(env, tmp_path, '--transfer', tmp_path / 'evil.pt')]:
        result = invoke(cli, args)
        assert_one_line_error(result, 'refusing to load it')
        assert 'runs the Python code' not in result.stderr
        assert not marker.exists() and not out(tmp_path).exists(), cli

def test_pickles_that_run_code_are_named_once_on_stderr_and_the_bundled_ones_are_not(env, tmp_path):
    network = tmp_path / 'copy.pkl' # A path no earlier test loaded in this process.
    network.write_bytes(open(env['net'], 'rb').read())
    result = invoke(*generate_args(env, tmp_path, '--network', network, '--seeds=0', '--steps=1', '--no-grid'))
    assert result.exit_code == 0, result.output
    assert result.stderr.count(f'Warning: loading network pickle {network} runs the Python code it contains') == 1
    result = invoke('generate', ['--outdir', tmp_path / 'bundled', '--seeds=0', '--steps=1', '--device=cpu', '--no-grid'])
    assert result.exit_code == 0 and 'runs the Python code' not in result.stderr

#----------------------------------------------------------------------------
# What bad input must not do beyond the one line.

def test_resuming_a_finished_training_state_says_so_and_writes_nothing(env, tmp_path):
    state = state_file(tmp_path, {'format': training_loop.STATE_FORMAT, 'cur_nimg': 4, 'cur_tick': 1, 'fingerprint': {}})
    args = train_args(env, tmp_path, '--resume', state)[1]
    args.remove('--dry-run')
    result = invoke('train', args)
    assert result.exit_code == 0, result.output
    assert 'is a finished run' in result.output and 'nothing to do' in result.output
    assert not out(tmp_path).exists()

def test_generate_resume_regenerates_a_png_that_does_not_decode(env, tmp_path):
    cli, args = generate_args(env, tmp_path, '--seeds=0-1', '--steps=2', '--no-grid')
    assert invoke(cli, args).exit_code == 0
    good = (out(tmp_path) / '000000.png').read_bytes()
    (out(tmp_path) / '000000.png').write_bytes(good[:len(good) // 2])
    result = invoke(cli, args + ['--resume'])
    assert result.exit_code == 0 and '1 of 2 images already exist' in result.output
    assert (out(tmp_path) / '000000.png').read_bytes() == good

def test_duplicate_seeds_are_generated_once_and_said_so(env, tmp_path):
    result = invoke(*generate_args(env, tmp_path, '--seeds=0,0,1,0-1', '--no-grid'))
    assert result.exit_code == 0 and 'more than once' in result.stderr
    assert sorted(os.listdir(out(tmp_path))) == ['000000.png', '000001.png']

def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(env, tmp_path, monkeypatch):
    import tempfile
    real_mkstemp = tempfile.mkstemp
    def mkstemp_on_full_disk(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open('/dev/full', os.O_WRONLY), name
    if not os.path.exists('/dev/full'):
        pytest.skip('no /dev/full')
    monkeypatch.setattr(tempfile, 'mkstemp', mkstemp_on_full_disk)
    result = invoke(*ref_args(env, tmp_path, dest=tmp_path / 'ref.npz'))
    assert_one_line_error(result, f'No space left on the device to write {tmp_path / "ref.npz"}', after_work=True)
    assert os.listdir(tmp_path) == []

def test_stale_temporaries_of_killed_writes_are_removed_by_the_next_write(env, tmp_path):
    stale = tmp_path / '.ref.npz.abcd1234.tmp'
    stale.write_bytes(b'half a file')
    os.utime(stale, (1, 1)) # Written long before this process started.
    result = invoke(*ref_args(env, tmp_path, dest=tmp_path / 'ref.npz'))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ['ref.npz']

def test_the_hidden_folder_of_a_killed_dataset_tool_run_is_removed_by_the_next(env, tmp_path):
    stale = tmp_path / '.dataset.abcd1234.tmp'
    stale.mkdir()
    (stale / 'img00000000.png').write_bytes(b'half')
    os.utime(stale, (1, 1))
    result = invoke('dataset_tool', ['--source', env['data'], '--dest', tmp_path / 'dataset'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ['dataset']

@pytest.mark.slow
def test_bad_input_in_a_fresh_process_is_one_line_too(env, tmp_path):
    """The table runs in-process; a few rows again as a user runs them, under python and torchrun."""
    for args in [['generate.py', f'--network={env["kinds"]["npz file"]}', f'--outdir={tmp_path / "o"}'],
            ['fid.py', 'calc', f'--images={env["data"]}', f'--ref={env["truncated_npz"]}'],
            ['train.py', f'--outdir={env["a_file"]}', f'--data={env["data"]}']]:
        result = run_cli([sys.executable, *args])
        assert result.returncode != 0 and 'Traceback' not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith('Error: ')]) == 1, result.stderr
    assert not (tmp_path / 'o').exists()

#----------------------------------------------------------------------------

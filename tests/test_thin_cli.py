"""The CLIs parse and dispatch: what they used to do inline is library code, and each claim is checked here."""

import ast
import glob
import os

import numpy as np
import pytest

import dnnlib
import generate
from conftest import REPO, make_tiny_net
from training import bundled
from training import dataset
from training import training_loop
from training import training_options
from training.evaluation import exposure_bias_metrics as metrics
from training.sampling import generation
from training.sampling import generation_setup
from training.sampling import presets
from training.sampling import time_shift as time_shift_lib

#----------------------------------------------------------------------------
# No CLI imports another: shared code lives in the library.

CLI_SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, '*.py')))

def imported_modules(path):
    """Top-level names of every module `path` imports, at any depth (imports inside functions too)."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names

def test_the_cli_scripts_are_found():
    assert {'generate.py', 'train.py', 'study.py', 'eps_norm.py', 'jacobian.py', 'fid.py', 'trainMoLRG.py'} <= set(CLI_SCRIPTS)

@pytest.mark.parametrize('script', CLI_SCRIPTS)
def test_no_cli_imports_another_cli(script):
    clis = {os.path.splitext(name)[0] for name in CLI_SCRIPTS}
    imported = imported_modules(os.path.join(REPO, script)) & clis
    assert not imported, f'{script} imports the CLI(s) {sorted(imported)}; move what they share into training/'

#----------------------------------------------------------------------------
# Presets: a preset is the flags it names.

def parsed_options(*args):
    """generate.py's options for `args` as click parses them, and the names given on the command line."""
    ctx = generate.main.make_context('generate.py', ['--outdir=out', *args])
    given = [name for name in ctx.params if ctx.get_parameter_source(name).name == 'COMMANDLINE']
    return ctx.params, given

@pytest.mark.parametrize('name', sorted(presets.PRESETS))
def test_a_preset_gives_the_settings_of_the_flags_it_names(name):
    preset = presets.PRESETS[name]
    by_name = presets.apply_preset(name, *parsed_options(f'--preset={name}'))
    flags = [f'--network={preset.network}', f'--eps_scaler={preset.eps_scaler}', f'--steps={preset.steps}']
    flags += ['--solver=euler'] if preset.solver == 'euler' else []
    by_flags = presets.apply_preset(None, *parsed_options(*flags))
    assert dict(by_name, preset=None) == by_flags

def test_flags_given_with_a_preset_override_it():
    name = 'edm-es-cifar10-cond-euler-nfe13'
    options = presets.apply_preset(name, *parsed_options(f'--preset={name}', '--steps=5', '--solver=heun', '--eps_scaler=1.1'))
    assert (options['num_steps'], options['solver'], options['eps_scaler']) == (5, 'heun', 1.1)
    assert options['network_pkl'] == presets.PRESETS[name].network

def test_a_heun_preset_keeps_edms_own_sampler():
    options = presets.apply_preset('edm-es-cifar10-cond-heun-nfe35', *parsed_options('--preset=edm-es-cifar10-cond-heun-nfe35'))
    assert options['solver'] is None and options['num_steps'] == 18

def test_no_preset_changes_nothing():
    options, given = parsed_options('--steps=7')
    assert presets.apply_preset(None, options, given) == options

#----------------------------------------------------------------------------
# Seeds still to do (--resume) and the grid.

def write_png(path, seed):
    generation.save_image(path, np.full([4, 4, 1], seed % 256, dtype=np.uint8))

@pytest.mark.parametrize('subdirs', [False, True])
def test_seeds_to_do_skips_the_saved_images_and_keeps_the_order(tmp_path, subdirs):
    outdir = str(tmp_path / 'out')
    for seed in [3, 1000, 7]:
        write_png(generation.image_path(outdir, seed, subdirs), seed)
    assert generation.seeds_to_do([9, 7, 1000, 2, 3, 1], outdir, subdirs) == [9, 2, 1]

def test_seeds_to_do_redoes_an_image_cut_short(tmp_path):
    outdir = str(tmp_path)
    write_png(generation.image_path(outdir, 0), 0)
    write_png(generation.image_path(outdir, 1), 1)
    with open(generation.image_path(outdir, 1), 'rb') as f:
        head = f.read(20)
    with open(generation.image_path(outdir, 1), 'wb') as f: # A killed write leaves the start of a PNG.
        f.write(head)
    assert generation.seeds_to_do([0, 1, 2], outdir) == [1, 2]

def test_seeds_to_do_reads_the_seeds_of_npz_files(tmp_path):
    outdir = str(tmp_path)
    images = np.zeros([2, 4, 4, 3], dtype=np.uint8)
    generation.save_npz(generation.npz_path(outdir, [5, 2]), images, seeds=[5, 2])
    assert generation.seeds_to_do([1, 2, 3, 4, 5, 6], outdir, npz=True) == [1, 3, 4, 6]
    assert generation.seeds_to_do([1, 2], str(tmp_path / 'missing'), npz=True) == [1, 2]

def test_seeds_to_do_refuses_an_npz_file_without_seeds(tmp_path):
    generation.save_npz(generation.npz_path(str(tmp_path), [0, 1]), np.zeros([2, 4, 4, 3], dtype=np.uint8))
    with pytest.raises(ValueError, match='does not record its seeds'):
        generation.seeds_to_do([0, 1], str(tmp_path), npz=True)

def test_the_grid_goes_beside_the_images_for_at_most_256_seeds(tmp_path):
    outdir = str(tmp_path / 'out')
    assert generation.grid_path(outdir, num_seeds=256) == outdir + '-grid.png'
    assert generation.grid_path(outdir, num_seeds=257) is None
    assert generation.grid_path(outdir, num_seeds=4, write_default=False) is None
    assert generation.grid_path(outdir, str(tmp_path / 'g.png'), num_seeds=1000) == str(tmp_path / 'g.png')
    with pytest.raises(ValueError, match='is inside --outdir'):
        generation.grid_path(outdir, os.path.join(outdir, 'sub', 'g.png'))

def test_the_grid_tiles_the_first_256_saved_images_in_seed_order(tmp_path):
    outdir = str(tmp_path / 'out')
    seeds = [5, 0, 9]
    for seed in seeds:
        write_png(generation.image_path(outdir, seed, True), seed)
    generation.save_grid(str(tmp_path / 'grid.png'), outdir, seeds, subdirs=True)
    grid = generation.load_image(str(tmp_path / 'grid.png'))
    assert grid.shape == (4 + 1 + 4, 4 + 1 + 4, 1) # 2x2 tiles, 1 px apart.
    assert [grid[0, 0, 0], grid[0, 5, 0], grid[5, 0, 0], grid[5, 5, 0]] == [5, 0, 9, 255]

#----------------------------------------------------------------------------
# Time shift and the denoiser of a run, from the options.

class EDMPrecond: # Time shift reads only the kind of network.
    pass

def test_time_shift_from_options_resolves_the_rule_and_keeps_the_settings():
    shift = time_shift_lib.from_options(EDMPrecond(), dict(num_steps=6, S_churn=0), 'auto', cutoff=200, window=40)
    assert (shift.rule, shift.num_steps, shift.cutoff, shift.window) == ('paper', 6, 200, 40)
    assert len(shift.grid) == 1000

def test_time_shift_from_options_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match='deterministic sampling only'):
        time_shift_lib.from_options(EDMPrecond(), dict(num_steps=6, S_churn=1), 'paper')
    with pytest.raises(ValueError, match='add --solver=euler'):
        time_shift_lib.from_options(EDMPrecond(), dict(num_steps=6), 'released')
    with pytest.raises(ValueError, match='--window must be at least 1'):
        time_shift_lib.from_options(EDMPrecond(), dict(num_steps=6), 'paper', window=0)

def setup_options(**changes):
    options, _given = parsed_options()
    return dnnlib.EasyDict(options, dg_weight_1st_order=0.0, **changes)

def test_the_setup_of_a_run_holds_what_the_flags_ask_for():
    setup = generation_setup.from_options(setup_options(eps_scaler=1.01, kappa=0.001, do_time_shift=True, solver='euler'), 'cpu')
    assert setup.source == bundled.NETWORK and type(setup.net).__name__ == 'EDMPrecond'
    assert setup.corrections == generation.Corrections(eps_scaler=1.01, kappa=0.001)
    assert setup.sampler_kwargs['solver'] == 'euler' and setup.time_shift.rule == 'paper'
    record = generation_setup.settings_record(setup, setup_options(eps_scaler=1.01, kappa=0.001, do_time_shift=True, solver='euler', seeds=[0, 1, 2, 5]), 'cpu')
    assert record['time_shift'] == dict(rule='paper', cutoff=300, window=80)
    assert record['seeds'] == '0-2,5' and record['sampler']['sampler'] == 'generalized (ablation)'
    assert len(record['sampler']['sigma_steps']) == 18 # One noise level per step, where its first evaluation is.

def test_the_setup_refuses_a_class_the_network_lacks():
    with pytest.raises(ValueError, match='--class=10 is out of range: the network has 10 classes'):
        generation_setup.from_options(setup_options(class_idx=10), 'cpu')

#----------------------------------------------------------------------------
# Shared by eps_norm.py and study.py.

def test_training_images_must_fit_the_network():
    net = make_tiny_net(label_dim=10, resolution=8, channels=3)
    with pytest.raises(dataset.DatasetError, match=r'--data has 1x16x16 images, the network 3x8x8'):
        metrics.load_training_images(bundled.DATA, net, 4)

def test_training_images_are_a_fixed_subset_with_labels():
    net = dnnlib.EasyDict(img_resolution=16, img_channels=1, label_dim=10)
    images, labels = metrics.load_training_images(bundled.DATA, net, 5)
    again, _ = metrics.load_training_images(bundled.DATA, net, 5)
    assert images.shape == (5, 1, 16, 16) and images.dtype == np.uint8 and labels.shape == (5, 10)
    assert np.array_equal(images, again)

#----------------------------------------------------------------------------
# Resuming training: the state is checked in the library, train.py only reports.

def test_resume_wants_a_training_state_file(tmp_path):
    with pytest.raises(training_loop.ResumeError, match='must point to a training-state-'):
        training_loop.resume_options(str(tmp_path / 'network-snapshot-000000.pkl'), dnnlib.EasyDict(total_kimg=1), {})

def test_resume_says_when_a_state_cannot_be_read(tmp_path):
    path = tmp_path / 'training-state-000010.pt'
    path.write_bytes(b'not a state')
    with pytest.raises(training_loop.ResumeError, match='training-state-000010.pt'):
        training_loop.resume_options(str(path), dnnlib.EasyDict(total_kimg=1), {})

def test_runs_are_numbered_after_the_folders_already_there(tmp_path):
    for name in ['00000-a', '00007-b', 'notes']:
        (tmp_path / name).mkdir()
    assert training_options.next_run_dir(str(tmp_path), 'digits') == str(tmp_path / '00008-digits')
    assert training_options.next_run_dir(str(tmp_path / 'new'), 'digits') == str(tmp_path / 'new' / '00000-digits')

def test_trainMoLRG_trains_with_train_py_defaults_for_the_options_it_lacks():
    import train
    import trainMoLRG
    offered = {param.name for param in trainMoLRG.main.params}
    lacking = {param.name: param.default for param in train.main.params if param.name not in offered and param.name != 'data'}
    assert trainMoLRG.TRAIN_DEFAULTS == lacking

#----------------------------------------------------------------------------

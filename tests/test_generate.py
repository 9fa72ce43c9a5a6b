"""generate.py: an image depends only on its seed; runs resume; bad input gets one clear line."""

import os
import pickle
import sys

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import generate
from conftest import make_tiny_net, run_cli, save_tiny_snapshot

#----------------------------------------------------------------------------

def generate_in_process(*args):
    result = CliRunner().invoke(generate.main, ['--device=cpu', *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def read_images(folder):
    """{relative path: uint8 array} of every PNG below folder."""
    images = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith('.png') and name != 'grid.png':
                path = os.path.join(root, name)
                images[os.path.relpath(path, folder)] = np.asarray(PIL.Image.open(path))
    return images

def assert_same_images(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name

#----------------------------------------------------------------------------

def test_same_seed_gives_the_same_image_at_any_batch_size(tmp_path, cond_net_pkl):
    runs = {}
    for batch in [1, 3, 8]:
        generate_in_process('--network', cond_net_pkl, '--outdir', tmp_path / f'b{batch}', '--seeds=0-7', f'--batch={batch}', '--steps=4')
        runs[batch] = read_images(tmp_path / f'b{batch}')
    assert sorted(runs[1]) == [f'{seed:06d}.png' for seed in range(8)]
    assert_same_images(runs[1], runs[3])
    assert_same_images(runs[1], runs[8])
    first = runs[1]['000000.png']
    assert first.shape == (8, 8, 3) and first.dtype == np.uint8
    assert len({runs[1][name].tobytes() for name in runs[1]}) == 8 # Different seeds, different images.

@pytest.mark.slow
def test_two_torchrun_ranks_write_the_same_images_as_one_process(tmp_path, cond_net_pkl):
    generate_in_process('--network', cond_net_pkl, '--outdir', tmp_path / 'single', '--seeds=0-9', '--batch=2', '--steps=3')
    result = run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py',
        '--device=cpu', f'--network={cond_net_pkl}', f'--outdir={tmp_path / "ranks"}', '--seeds=0-9', '--batch=2', '--steps=3'])
    assert result.returncode == 0, result.stderr
    assert_same_images(read_images(tmp_path / 'single'), read_images(tmp_path / 'ranks'))

def test_class_option_fixes_the_label(tmp_path, cond_net_pkl):
    generate_in_process('--network', cond_net_pkl, '--outdir', tmp_path / 'random', '--seeds=0-3', '--steps=3')
    generate_in_process('--network', cond_net_pkl, '--outdir', tmp_path / 'c1', '--seeds=0-3', '--steps=3', '--class=1')
    generate_in_process('--network', cond_net_pkl, '--outdir', tmp_path / 'c1again', '--seeds=0-3', '--steps=3', '--class=1', '--batch=1')
    random, c1 = read_images(tmp_path / 'random'), read_images(tmp_path / 'c1')
    assert_same_images(c1, read_images(tmp_path / 'c1again'))
    assert any(not np.array_equal(random[name], c1[name]) for name in random)

def test_subdirs_group_seeds_by_thousand(tmp_path, uncond_net_pkl):
    generate_in_process('--network', uncond_net_pkl, '--outdir', tmp_path, '--seeds=998-1001', '--subdirs', '--steps=2')
    assert sorted(read_images(tmp_path)) == ['000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png']

def test_resume_generates_only_missing_images_and_they_match_a_fresh_run(tmp_path, uncond_net_pkl):
    out = tmp_path / 'out'
    generate_in_process('--network', uncond_net_pkl, '--outdir', out, '--seeds=0-5', '--steps=3', '--batch=4')
    fresh = read_images(out)
    for seed in [1, 4]:
        os.remove(out / f'{seed:06d}.png')
    kept = out / '000000.png'
    os.utime(kept, (1, 1)) # Mark an existing file: a resumed run must not rewrite it.
    result = generate_in_process('--network', uncond_net_pkl, '--outdir', out, '--seeds=0-5', '--steps=3', '--batch=4', '--resume')
    assert '4 of 6 images already exist' in result.output
    assert os.stat(kept).st_mtime == 1
    assert_same_images(fresh, read_images(out))
    assert not [name for name in os.listdir(out) if not name.endswith('.png')] # No temporary files left behind.

def test_grid_tiles_the_generated_images_beside_the_image_folder(tmp_path, uncond_net_pkl):
    out = tmp_path / 'out'
    generate_in_process('--network', uncond_net_pkl, '--outdir', out, '--seeds=0-5', '--steps=2')
    assert sorted(os.listdir(out)) == [f'{seed:06d}.png' for seed in range(6)] # The folder is the image set, nothing else.
    grid = np.asarray(PIL.Image.open(tmp_path / 'out-grid.png'))
    images = read_images(out)
    assert grid.shape == (2 * 8 + 1, 3 * 8 + 2, 3) # 1 px between 8 px images.
    assert np.array_equal(grid[9:17, 0:8], images['000003.png'])
    assert np.array_equal(grid[0:8, 9:17], images['000001.png'])
    assert (grid[8, :] == 255).all() and (grid[:, 8] == 255).all()
    elsewhere = tmp_path / 'grids' / 'g.png'
    generate_in_process('--network', uncond_net_pkl, '--outdir', tmp_path / 'out2', '--seeds=0-5', '--steps=2', f'--grid={elsewhere}')
    assert elsewhere.is_file() and not (tmp_path / 'out2-grid.png').exists()

#----------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback, nothing written.

@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('bad')
    good = save_tiny_snapshot(folder / 'good.pkl', make_tiny_net(label_dim=4))
    with open(good, 'rb') as f:
        data = f.read()
    (folder / 'truncated.pkl').write_bytes(data[:len(data) // 2])
    (folder / 'garbage.pkl').write_bytes(np.random.RandomState(0).bytes(1000))
    with open(folder / 'no_ema.pkl', 'wb') as f:
        pickle.dump(dict(network=1), f)
    return folder

@pytest.mark.parametrize('args,message', [
    (['--network={bad}/missing.pkl'], 'not found'),
    (['--network={bad}/truncated.pkl'], 'not a readable network pickle'),
    (['--network={bad}/garbage.pkl'], 'not a readable network pickle'),
    (['--network={bad}/no_ema.pkl'], 'has no "ema" entry'),
    (['--network={bad}/good.pkl', '--seeds=5-2'], 'is empty'),
    (['--network={bad}/good.pkl', '--seeds=x'], 'is not a seed'),
    (['--network={bad}/good.pkl', '--class=4'], 'out of range: the network has 4 classes'),
])
@pytest.mark.slow
def test_bad_input_gets_one_clear_line(tmp_path, bad_files, args, message):
    out = tmp_path / 'out'
    result = run_cli([sys.executable, 'generate.py', '--device=cpu', f'--outdir={out}', *[a.format(bad=bad_files) for a in args]])
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert not out.exists()

def test_class_on_an_unconditional_network_is_refused(tmp_path, uncond_net_pkl):
    result = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={uncond_net_pkl}', f'--outdir={tmp_path / "out"}', '--class=0'])
    assert result.exit_code != 0 and 'the network is unconditional' in result.output
    assert not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------

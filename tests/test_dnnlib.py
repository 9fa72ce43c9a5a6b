"""URL opening works offline, writes are atomic, and the small utilities behave."""

import hashlib
import os
import pickle

import pytest
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats

#----------------------------------------------------------------------------

def test_open_url_reads_local_paths_and_file_urls(tmp_path):
    path = tmp_path / 'weights.bin'
    path.write_bytes(b'abc')
    with dnnlib.util.open_url(str(path)) as f:
        assert f.read() == b'abc'
    with dnnlib.util.open_url(path.as_uri()) as f:
        assert f.read() == b'abc'
    assert dnnlib.util.open_url(str(path), return_filename=True) == str(path)

def test_open_url_serves_a_cached_download_without_network(tmp_path):
    url = 'https://example.invalid/pretrained/net.pkl'
    cached = tmp_path / (hashlib.md5(url.encode()).hexdigest() + '_net.pkl')
    cached.write_bytes(b'cached bytes')
    with dnnlib.util.open_url(url, cache_dir=str(tmp_path)) as f:
        assert f.read() == b'cached bytes'

def test_failed_download_names_the_url_the_cache_and_the_local_alternative(tmp_path):
    url = 'http://127.0.0.1:9/models/inception.pkl' # Port 9 (discard) refuses at once.
    with pytest.raises(dnnlib.util.DownloadError) as info:
        dnnlib.util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    message = str(info.value)
    assert url in message and str(tmp_path) in message and 'local path' in message
    assert hashlib.md5(url.encode()).hexdigest() + '_inception.pkl' in message
    assert os.listdir(tmp_path) == [] # Nothing half-downloaded.

def test_missing_local_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.pkl'):
        dnnlib.util.open_url(str(tmp_path / 'nothing.pkl'))

#----------------------------------------------------------------------------

def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / 'snapshot.pkl'
    path.write_bytes(b'old')
    with pytest.raises(KeyboardInterrupt):
        with dnnlib.util.atomic_write(str(path)) as f:
            f.write(b'half of the new')
            raise KeyboardInterrupt
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['snapshot.pkl']
    with dnnlib.util.atomic_write(str(path), fsync=True) as f:
        f.write(b'new')
    assert path.read_bytes() == b'new' and os.listdir(tmp_path) == ['snapshot.pkl']
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~dnnlib.util.current_umask() # Not private to the writer.

def test_easydict_is_a_picklable_attribute_dict():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == dict(a=1, b=2) and d.a == 1
    with pytest.raises(AttributeError):
        d.missing
    assert pickle.loads(pickle.dumps(d)) == d and type(pickle.loads(pickle.dumps(d))) is dnnlib.util.EasyDict

def test_construct_class_by_name():
    net = dnnlib.util.construct_class_by_name(class_name='training.networks.Linear', in_features=3, out_features=2)
    assert net.weight.shape == (2, 3)
    assert dnnlib.util.get_obj_by_name('torch.nn.functional.silu') is torch.nn.functional.silu

#----------------------------------------------------------------------------

def test_unlaunched_process_is_rank_zero_of_one():
    assert dist.init('cpu') == torch.device('cpu')
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    t = torch.ones(3)
    assert torch.equal(dist.all_reduce_sum(t), torch.ones(3))
    assert dist.broadcast_object({'x': 1}) == {'x': 1}
    dist.barrier()

def test_training_stats_collects_mean_and_std_per_tick():
    training_stats.reset()
    collector = training_stats.Collector(regex='Loss/.*')
    training_stats.report('Loss/loss', torch.tensor([1.0, 2.0, 3.0]))
    training_stats.report('Loss/loss', torch.tensor([4.0]))
    training_stats.report('Other/x', torch.tensor([100.0]))
    collector.update()
    assert collector.names() == ['Loss/loss']
    assert collector.num('Loss/loss') == 4 and collector['Loss/loss'] == pytest.approx(2.5)
    assert collector.std('Loss/loss') == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std(unbiased=False).item())
    training_stats.report('Loss/loss', torch.tensor([10.0]))
    collector.update() # Only what came since the last update counts.
    assert collector.num('Loss/loss') == 1 and collector['Loss/loss'] == 10
    assert collector.as_dict() == {'Loss/loss': dict(num=1, mean=10.0, std=0.0)}

#----------------------------------------------------------------------------

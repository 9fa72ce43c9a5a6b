"""One command that checks this codebase on a CUDA machine and prints what it measured.

    python benchmarks/gpu_check.py                          # this codebase only
    python benchmarks/gpu_check.py --nvidia-edm=../edm      # and NVIDIA EDM's code side by side

Rows (each in a fresh process, so that the peak GPU memory is that run's own):
- generate: the EDM sampler of generate.py (training.sampling.generation) on the bundled digits model and
  on a CIFAR-size DDPM++ (random weights, 56M parameters) at batch 64 and 512: images/s, and the
  same seeds' images against a CPU run (pixels of 255 levels; pass: at most 1% differ by > 2).
- train: train.py for 1 kimg of a random CIFAR-size data set, DDPM++ at batch 64, fp32 and --fp16
  on one GPU, and under torchrun with 2 ranks when there are two GPUs: sec/kimg of the last tick
  (the first one carries the start-up) and the peak GPU memory from stats.jsonl.
- CDM step ratio: sec/kimg of --precond=cdm over --precond=edm (fp32, one GPU).
- fid: fid.py calc on 10k images (needs EDM's Inception pickle: downloaded, or --detector=PATH).
With --nvidia-edm=DIR (a checkout of github.com/NVlabs/edm) the generate and train rows also run
NVIDIA's code: its own network classes get the same weights, its sampler the same seeds.

Runs in under 10 minutes on one recent GPU; --keep keeps the work folder. Without CUDA it stops
with one line. The table also goes to WORKDIR/gpu_check.json.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import click
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]) # train.py --arch=ddpmpp.
NUM_CPU_SEEDS = 8 # Images compared with a CPU run.

#----------------------------------------------------------------------------
# Worker: generate images with one codebase's own network classes and sampler; prints one JSON line.
# Imports nothing of this repository at the top, so that NVIDIA EDM's packages of the same names
# (dnnlib, torch_utils, training) can come first on sys.path.

def rebuild_with_own_classes(net, networks_module):
    """The same weights in this codebase's class of the same name (a pickle carries its writer's source)."""
    own = getattr(networks_module, type(net).__name__)(**net.init_kwargs)
    own.load_state_dict(net.state_dict())
    return own.eval().requires_grad_(False)

def edm_batches(codebase, net, seeds, batch, device):
    """NVIDIA EDM's generate.py loop: StackedRandomGenerator, random labels, edm_sampler."""
    sys.path.insert(0, codebase)
    import generate as edm_generate # NVIDIA's.
    for start in range(0, len(seeds), batch):
        batch_seeds = seeds[start:start + batch]
        rnd = edm_generate.StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(batch_seeds)], device=device)] if net.label_dim else None
        with torch.no_grad():
            images = edm_generate.edm_sampler(net, latents, labels, randn_like=rnd.randn_like)
        yield (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def worker_generate(codebase, network_pkl, num_seeds, batch, device, save):
    device = torch.device(device)
    sys.path.insert(0, REPO if codebase == 'ours' else codebase)
    import dnnlib
    from training import networks
    with dnnlib.util.open_url(network_pkl) as f:
        net = rebuild_with_own_classes(pickle.load(f)['ema'], networks).to(device)
    if codebase == 'ours':
        from training.sampling import generation
        run = lambda seeds: (b.images for b in generation.generate_images(net, seeds, max_batch_size=batch, device=device))
    else:
        run = lambda seeds: edm_batches(codebase, net, seeds, batch, device)
    seeds = list(range(num_seeds))
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    list(run(seeds[:batch])) # Warm-up: cuDNN autotuning, allocator.
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    images = np.concatenate(list(run(seeds)))
    sync()
    seconds = time.time() - start
    np.save(save, images[:NUM_CPU_SEEDS])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    print(json.dumps(dict(images_per_sec=len(seeds) / seconds, peak_gib=peak)))

def worker_script(script, args):
    """Run a CLI of this repository in this process, then report its wall time and peak GPU memory."""
    import runpy
    sys.path.insert(0, REPO)
    sys.argv = [script, *args]
    start = time.time()
    code = 0
    try:
        runpy.run_path(os.path.join(REPO, script), run_name='__main__')
    except SystemExit as e:
        code = e.code or 0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps(dict(seconds=time.time() - start, peak_gib=peak, exit_code=code)))

#----------------------------------------------------------------------------
# The parent: builds inputs, runs the workers, prints the table.

def run_worker(args, timeout, env=None):
    """The JSON line of a worker, or {'error': last line of its output}."""
    full_env = dict(os.environ, **(env or {}))
    try:
        result = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return dict(error=f'timed out after {timeout} s')
    lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ['no output'])[-1]
        return dict(error=tail[:160])
    return json.loads(lines[-1])

def run_train(command, outdir, timeout, env=None):
    """sec/kimg of the last tick and its peak GPU memory, from the run's stats.jsonl."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired:
        return dict(error=f'timed out after {timeout} s')
    stats = [os.path.join(root, 'stats.jsonl') for root, _dirs, files in os.walk(outdir) if 'stats.jsonl' in files]
    if result.returncode != 0 or not stats:
        tail = (result.stderr.strip().splitlines() or ['no output'])[-1]
        return dict(error=tail[:160])
    last = json.loads(open(stats[0]).read().splitlines()[-1])
    mean = lambda key: last[key]['mean'] if key in last else None
    return dict(sec_per_kimg=mean('Timing/sec_per_kimg'), peak_gib=mean('Resources/peak_gpu_mem_gb'))

def write_random_dataset(path, num, resolution=32, seed=0):
    """An uncompressed zip of random RGB PNGs, as dataset_tool.py writes (no labels)."""
    import PIL.Image
    rnd = np.random.RandomState(seed)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i in range(num):
            image = rnd.randint(0, 256, [resolution, resolution, 3], dtype=np.uint8)
            with z.open(f'{i // 1000:05d}/img{i:08d}.png', 'w') as f:
                PIL.Image.fromarray(image).save(f, format='png')

def write_random_ddpmpp(path):
    """A CIFAR-size DDPM++ EDMPrecond with random weights, saved as a snapshot pickle."""
    sys.path.insert(0, REPO)
    import dnnlib
    from training import checkpoint, networks
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=32, img_channels=3, label_dim=0, **DDPMPP)
    with torch.no_grad(): # EDM zero-initializes each block's last layer; give every layer a say.
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    checkpoint.save_snapshot(path, dict(ema=net.eval(), loss_fn=None, augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(path='random.zip')))

def compare_to_cpu(npy, cpu_npy):
    """'max N, >2: P%' for two uint8 image arrays; pass means at most 1% of pixels differ by more than 2 levels."""
    if not (os.path.isfile(npy) and os.path.isfile(cpu_npy)):
        return 'n/a'
    a, b = np.load(npy).astype(np.int32), np.load(cpu_npy).astype(np.int32)
    diff = np.abs(a - b)
    over = float((diff > 2).mean()) * 100
    return f'{"pass" if over <= 1 else "FAIL"} (max {diff.max()}, >2: {over:.2f}%)'

def fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else '-'

def cell(result, key, spec):
    return result['error'] if 'error' in result else fmt(result.get(key), spec)

@click.command()
@click.option('--nvidia-edm', 'nvidia_edm', help='A checkout of NVIDIA EDM to measure side by side', metavar='DIR', type=click.Path(file_okay=False))
@click.option('--detector', help='Inception pickle for the FID row  [default: download EDM\'s]', metavar='PATH|URL', type=str)
@click.option('--workdir', help='Where inputs and runs go  [default: a temporary folder]', metavar='DIR', type=str)
@click.option('--keep', help='Keep the work folder', is_flag=True)
def main(nvidia_edm, detector, workdir, keep):
    """Measure generation, training and FID on this machine's GPU(s) and print a table."""
    if not torch.cuda.is_available():
        raise click.ClickException('gpu_check.py measures CUDA runs, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)')
    if nvidia_edm is not None and not all(os.path.isfile(os.path.join(nvidia_edm, name)) for name in ['generate.py', 'train.py', 'training/networks.py']):
        raise click.ClickException(f'--nvidia-edm={nvidia_edm} is not a checkout of NVIDIA EDM (generate.py, train.py, training/networks.py)')
    workdir = workdir or tempfile.mkdtemp(prefix='gpu_check-')
    os.makedirs(workdir, exist_ok=True)
    codebases = [('ours', 'ours')] + ([('NVIDIA EDM', os.path.abspath(nvidia_edm))] if nvidia_edm else [])
    num_gpus = torch.cuda.device_count()
    started = time.time()
    rows = []
    def add(check, results, extra=''):
        rows.append(dict(check=check, results=results, note=extra))
        print(f'  done: {check} ({time.time() - started:.0f} s)', file=sys.stderr)

    # Generation.
    sys.path.insert(0, REPO)
    from training import bundled
    ddpmpp_pkl = os.path.join(workdir, 'ddpmpp-random.pkl')
    write_random_ddpmpp(ddpmpp_pkl)
    for model, pkl, num_seeds in [('bundled digits 16x16', bundled.NETWORK, 512), ('DDPM++ 32x32 random', ddpmpp_pkl, 512)]:
        cpu_npy = os.path.join(workdir, f'{os.path.basename(pkl)}-cpu.npy')
        run_worker(['_generate', 'ours', pkl, str(NUM_CPU_SEEDS), str(NUM_CPU_SEEDS), 'cpu', cpu_npy], timeout=300)
        for batch in [64, 512]:
            results = {}
            for name, codebase in codebases:
                npy = os.path.join(workdir, f'{os.path.basename(pkl)}-{name.replace(" ", "_")}-{batch}.npy')
                result = run_worker(['_generate', codebase, pkl, str(num_seeds), str(batch), 'cuda', npy], timeout=300)
                result['vs_cpu'] = compare_to_cpu(npy, cpu_npy)
                results[name] = result
            add(f'generate {model}, batch {batch}: images/s', {k: dict(value=cell(r, 'images_per_sec', '.1f'), peak=fmt(r.get('peak_gib'), '.2f'),
                note=r['vs_cpu']) for k, r in results.items()})

    # Training.
    data = os.path.join(workdir, 'random-32x32.zip')
    write_random_dataset(data, 2000)
    train_args = ['--data', data, '--cond=0', '--arch=ddpmpp', '--batch=64', '--duration=0.001', '--tick=1', '--snap=1000', '--dump=1000', '--seed=0']
    configs = [('fp32, 1 GPU', [], 1), ('--fp16, 1 GPU', ['--fp16=1'], 1)]
    if num_gpus >= 2:
        configs.append(('fp32, torchrun 2 ranks', [], 2))
    sec_per_kimg = {}
    for label, extra, ranks in configs:
        results = {}
        for name, codebase in codebases:
            folder = REPO if codebase == 'ours' else codebase
            outdir = os.path.join(workdir, f'train-{name.replace(" ", "_")}-{len(sec_per_kimg)}')
            launcher = [sys.executable] if ranks == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}']
            command = [*launcher, os.path.join(folder, 'train.py'), f'--outdir={outdir}', *train_args, *extra]
            env = dict(CUDA_VISIBLE_DEVICES='0') if ranks == 1 else None
            results[name] = run_train(command, outdir, timeout=400 if codebase == 'ours' else 300, env=env)
        sec_per_kimg[label] = results['ours'].get('sec_per_kimg')
        add(f'train.py DDPM++ batch 64, {label}: sec/kimg', {k: dict(value=cell(r, 'sec_per_kimg', '.2f'), peak=fmt(r.get('peak_gib'), '.2f'), note='')
            for k, r in results.items()})

    # CDM step ratio (this codebase only: NVIDIA EDM has no consistency loss).
    outdir = os.path.join(workdir, 'train-cdm')
    cdm = run_train([sys.executable, os.path.join(REPO, 'train.py'), f'--outdir={outdir}', *train_args, '--precond=cdm'], outdir, timeout=400,
        env=dict(CUDA_VISIBLE_DEVICES='0'))
    ratio = cdm['sec_per_kimg'] / sec_per_kimg['fp32, 1 GPU'] if 'error' not in cdm and sec_per_kimg.get('fp32, 1 GPU') else None
    add('train.py --precond=cdm / --precond=edm: step time ratio', {'ours': dict(value=cell(cdm, 'sec_per_kimg', '.2f') if ratio is None else f'{ratio:.2f}',
        peak=fmt(cdm.get('peak_gib'), '.2f'), note='martingale_steps=6')})

    # FID of 10k images.
    import PIL.Image
    images = os.path.join(workdir, 'fid-images')
    os.makedirs(images, exist_ok=True)
    rnd = np.random.RandomState(1)
    for i in range(10000):
        PIL.Image.fromarray(rnd.randint(0, 256, [32, 32, 3], dtype=np.uint8)).save(os.path.join(images, f'{i:06d}.png'))
    detector_args = [f'--detector={detector}'] if detector else []
    ref = os.path.join(workdir, 'fid-ref.npz')
    made_ref = run_worker(['_script', 'fid.py', 'ref', f'--data={images}', f'--dest={ref}', *detector_args], timeout=400)
    fid = run_worker(['_script', 'fid.py', 'calc', f'--images={images}', f'--ref={ref}', '--num=10000', *detector_args], timeout=400) \
        if 'error' not in made_ref and made_ref.get('exit_code') == 0 else dict(error=made_ref.get('error', 'fid.py ref failed (detector not available?)'))
    if 'error' not in fid and fid.get('exit_code') != 0:
        fid = dict(error=f'fid.py calc exited with {fid["exit_code"]}')
    add('fid.py calc, 10k images: seconds', {'ours': dict(value=cell(fid, 'seconds', '.1f'), peak=fmt(fid.get('peak_gib'), '.2f'), note='')})

    # The table.
    names = [name for name, _ in codebases]
    header = ['check'] + [f'{name}' for name in names] + [f'{name} peak GiB' for name in names] + ['generate: same seeds vs CPU']
    table = [[row['check']] + [row['results'].get(n, {}).get('value', '-') for n in names] + [row['results'].get(n, {}).get('peak', '-') for n in names]
        + ['; '.join(f'{n}: {row["results"][n]["note"]}' for n in names if row['results'].get(n, {}).get('note'))] for row in rows]
    widths = [max(len(str(line[i])) for line in [header] + table) for i in range(len(header))]
    print(f'\nGPU check on {torch.cuda.get_device_name(0)} x {num_gpus}, torch {torch.__version__}, CUDA {torch.version.cuda}, '
        f'{time.time() - started:.0f} s\n')
    for line in [header, ['-' * w for w in widths]] + table:
        print(' | '.join(str(value).ljust(width) for value, width in zip(line, widths)))
    with open(os.path.join(workdir, 'gpu_check.json'), 'w') as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), num_gpus=num_gpus, torch=torch.__version__, rows=rows), f, indent=2)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '_generate':
        codebase, network_pkl, num_seeds, batch, device, save = sys.argv[2:8]
        worker_generate(codebase, network_pkl, int(num_seeds), int(batch), device, save)
    elif len(sys.argv) > 1 and sys.argv[1] == '_script':
        worker_script(sys.argv[2], sys.argv[3:])
    else:
        main()

#----------------------------------------------------------------------------

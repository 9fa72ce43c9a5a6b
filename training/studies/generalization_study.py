"""The memorization-to-generalization study: small EDM models trained on nested subsets of a data
set, measured against their training images and against the optimal denoiser of those images.

Zhang et al. ("The Emergence of Reproducibility and Consistency in Diffusion Models", ICML 2024)
find that diffusion models trained on few images memorize: their samples copy training images and
match the samples of the optimal denoiser of the training set (training/sampling/optimal_denoiser.py) from
the same noise. Past a data-set size that grows with the model, they generalize, and models of
different architectures or widths trained on the same data still produce nearly the same image
from the same noise (reproducibility). Their Jacobians are low-rank along the trajectory.

For each subset size n (nested subsets, the rest of the data held out) and each width:
  1. train.py trains an unconditional DDPM++ network on the n images (a subprocess per model,
     resumed from its latest training state when killed, with a FINISHED marker when done);
  2. the model and the optimal denoiser of the subset sample the same seeds with the same sampler;
  3. M score  = copy_detection.memorization_score(samples, subset) (1 - the fraction of samples
     that copy a training image; 0 means all copies),
     RP score = copy_detection.reproducibility_score(samples, optimal denoiser's samples),
     and the RP score between the widths trained on the same subset;
  4. for the widest model of the smallest and of the largest subset, the Jacobian ranks along one
     trajectory (training/evaluation/jacobian_rank.py) next to those of the optimal denoiser.

Descriptor: SSCD cannot be had offline, so copies are judged by the cosine similarity of
mean-centred pixels (`pixel_descriptors`); `descriptor_check` measures how well it and the bundled
digit detector's features separate noisy copies from real unseen digits. The threshold is not
guessed: for each subset it is the largest similarity any held-out image has to its nearest
training image (`calibrate_threshold`), so a "copy" is closer to a training image than any real
unseen image is.

Every finished step is stored in study.json at once; a killed study continues where it stopped
when run again with the same settings.
"""

import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import tqdm

import dnnlib
from training import checkpoint
from training.evaluation import copy_detection
from training import dataset as dataset_lib
from training.evaluation import feature_detectors
from training.sampling import generation
from training.evaluation import jacobian_rank
from training.sampling import optimal_denoiser as optimal_denoiser_lib
from training.sampling import sampler as sampler_lib

#----------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO_ROOT, 'train.py')
FINISHED = 'FINISHED'
NOISY_COPY_STD = 10 # On the 0-255 scale: a copy with visible grain, still the same image.

class StudyError(Exception):
    """Bad input or a state of --outdir the study cannot continue from; the message is one line."""

#----------------------------------------------------------------------------
# Data.

def load_images(path):
    """uint8 [N, C, H, W] images of a dataset zip or folder, and the file name of each."""
    dataset = dataset_lib.ImageFolderDataset(path)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    names = [dataset.image_fnames[int(i)] for i in dataset._raw_idx]
    return images, names

def nested_split(num_images, sizes, split_seed):
    """(subsets, held_out): subsets[n] = the first n indices of one fixed permutation, so the
    subsets are nested; held_out = the indices of no subset (everything past the largest one)."""
    if max(sizes) >= num_images:
        raise StudyError(f'The largest subset ({max(sizes)} images) leaves no held-out image of the {num_images} in the data')
    order = np.random.RandomState(split_seed).permutation(num_images)
    return {n: np.sort(order[:n]) for n in sizes}, np.sort(order[max(sizes):])

def write_subset_zip(images, dest):
    """uint8 [N, C, H, W] images -> an uncompressed dataset zip of PNGs (dataset_tool.py's layout), atomically."""
    import PIL.Image
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, image in enumerate(images):
            png = io.BytesIO()
            PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(png, format='PNG')
            z.writestr(f'{i // 1000:05d}/img{i:08d}.png', png.getvalue())
        z.writestr('dataset.json', json.dumps(dict(labels=None)))
    with dnnlib.util.atomic_write(dest) as f:
        f.write(buffer.getvalue())

#----------------------------------------------------------------------------
# The copy descriptor and its threshold.

def pixel_descriptors(images):
    """uint8 [N, C, H, W] -> float64 [N, C*H*W]: pixels minus each image's mean, unit length.

    Their dot product is the correlation of two images: 1 for a copy (also one that is brighter or
    of other contrast), near 0 for unrelated images.
    """
    x = torch.as_tensor(np.asarray(images)).reshape(len(images), -1).to(torch.float64)
    return copy_detection.l2_normalize(x - x.mean(dim=1, keepdim=True))

def nearest_similarity(queries, references):
    """For each query descriptor, the cosine similarity of its nearest reference: float64 [N]."""
    return copy_detection.max_cosine_similarity(queries, references).to(torch.float64)

def calibrate_threshold(training_descriptors, held_out_descriptors):
    """The largest nearest-training similarity of any held-out image: above it means a copy."""
    return float(nearest_similarity(held_out_descriptors, training_descriptors).max())

def noisy_copies(images, std=NOISY_COPY_STD, seed=0):
    """uint8 images plus Gaussian noise of `std` (0-255 scale), rounded and clipped."""
    gen = np.random.RandomState(seed)
    return np.clip(np.round(np.asarray(images, dtype=np.float64) + std * gen.standard_normal(np.shape(images))), 0, 255).astype(np.uint8)

def descriptor_check(describe, training_images, held_out_images, std=NOISY_COPY_STD):
    """How well a descriptor tells copies from unseen images.

    describe: uint8 images -> [N, D] features. Returns the calibrated threshold (held-out images'
    largest nearest-training similarity), the smallest similarity of a noisy copy of a training
    image to the training set, the margin between the two (positive: every noisy copy is flagged),
    and the fraction of noisy copies above the threshold.
    """
    train = describe(training_images)
    threshold = calibrate_threshold(train, describe(held_out_images))
    copies = nearest_similarity(describe(noisy_copies(training_images, std)), train)
    margin = float(copies.min()) - threshold
    return dict(threshold=threshold, min_noisy_copy_similarity=float(copies.min()), margin=margin,
        relative_margin=margin / max(1 - threshold, 1e-12), # Descriptors crowd similarities near 1 to different degrees.
        noisy_copies_flagged=float((copies > threshold).to(torch.float64).mean()), noise_std=std)

#----------------------------------------------------------------------------
# Scores.

def memorization_scores(samples, training_images, threshold, describe=pixel_descriptors):
    """M score of samples (uint8 NCHW) against their training images (1 - fraction of copies)."""
    m_score = copy_detection.memorization_score(describe(samples), describe(training_images), threshold)
    return dict(m_score=m_score, copy_fraction=1 - m_score)

def rp_score(samples_a, samples_b, threshold, describe=pixel_descriptors):
    """RP score of two sample sets of the same seeds, in order."""
    return copy_detection.reproducibility_score(describe(samples_a), describe(samples_b), threshold)

def sscd_descriptors(model_path, device=torch.device('cpu'), batch_size=64):
    """uint8 images -> SSCD descriptors (float64) of the model at model_path, for real data on a GPU."""
    model = copy_detection.load_sscd_model(model_path, device=device, verbose=False)
    def describe(images):
        images = torch.as_tensor(np.asarray(images))
        return torch.cat([model(copy_detection.sscd_input(images[i:i + batch_size].to(device))).cpu() for i in range(0, len(images), batch_size)]).to(torch.float64)
    return describe

def generate_samples(denoiser, seeds, num_steps, batch_size=64, device=torch.device('cpu')):
    """uint8 [N, C, H, W] samples of the EDM sampler (Heun) for `seeds`, as generate.py makes them."""
    batches = generation.generate_images(denoiser, seeds, batch_size, device=device, sampler_kwargs=dict(num_steps=num_steps))
    return np.concatenate([batch.images for batch in batches]).transpose(0, 3, 1, 2)

def trajectory_ranks(denoiser, num_steps, seed=0, device=torch.device('cpu')):
    """Exact Jacobian ranks along the trajectory of `seed` (the same latents as generate.py)."""
    rnd = sampler_lib.StackedRandomGenerator(device, [seed])
    latents = rnd.randn([1, denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution], device=device)
    return jacobian_rank.trajectory_jacobian_ranks(denoiser, latents, seed=seed, num_steps=num_steps)

#----------------------------------------------------------------------------
# Training one model with train.py.

def model_name(size, width):
    return f'n{size:05d}-c{width}'

# train.py's file names: EDM's kimg with 6 digits, plus .NNN when snapshots are under 1 kimg apart.
RUN_FILE = re.compile(r'(network-snapshot|training-state)-(\d+(?:\.\d{3})?)\.(pkl|pt)')

def latest_run_file(run_dir, kind):
    """The run file of `kind` ('network-snapshot' or 'training-state') of the most images in run_dir, or None."""
    found = [(float(m.group(2)), f) for f in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
        if (m := RUN_FILE.fullmatch(f)) and m.group(1) == kind]
    return os.path.join(run_dir, max(found)[1]) if found else None

def latest_training_state(run_dir):
    """The training-state-*.pt of the most images in run_dir, or None."""
    return latest_run_file(run_dir, 'training-state')

def latest_snapshot(run_dir):
    return latest_run_file(run_dir, 'network-snapshot')

def train_command(data, run_dir, width, config, device):
    """train.py's command line for one model: unconditional DDPM++, no dropout or augmentation."""
    kimg = config['kimg']
    tick = kimg / 10 # Ten progress lines; a training state every two, so a kill loses at most a fifth.
    cmd = [sys.executable, TRAIN_SCRIPT, f'--outdir={run_dir}', '--nosubdir', f'--data={data}', '--cond=0', '--arch=ddpmpp',
        f'--cbase={width}', f'--cres={",".join(map(str, config["cres"]))}', '--dropout=0', '--augment=0', f'--batch={config["batch"]}', f'--lr={config["lr"]}',
        f'--lr_rampup={kimg / 20:g}', f'--duration={kimg / 1000:g}', f'--tick={tick:g}', '--snap=2', '--dump=2',
        f'--seed={config["train_seed"]}', '--workers=0', f'--device={device}']
    state = latest_training_state(run_dir)
    if state is not None:
        cmd.append(f'--resume={state}')
    return cmd

class Training:
    """One train.py subprocess, its output in run_dir/train.log."""
    def __init__(self, name, cmd, run_dir):
        self.name, self.run_dir = name, run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.log = open(os.path.join(run_dir, 'train.log'), 'a')
        self.log.write(f'\n$ {" ".join(cmd)}\n')
        self.log.flush()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
        self.resumed = any(arg.startswith('--resume=') for arg in cmd)
        self.start = time.time()
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def poll(self):
        """None while running; otherwise the exit status (and the log is closed)."""
        rc = self.process.poll()
        if rc is not None and not self.log.closed:
            self.log.close()
        return rc

    def finish(self):
        """Mark the model finished and drop the intermediate snapshots and states."""
        snapshot = latest_snapshot(self.run_dir)
        for f in os.listdir(self.run_dir):
            if RUN_FILE.fullmatch(f) and os.path.join(self.run_dir, f) != snapshot:
                os.remove(os.path.join(self.run_dir, f))
        with dnnlib.util.atomic_write(os.path.join(self.run_dir, FINISHED), mode='w') as f:
            json.dump(dict(snapshot=os.path.basename(snapshot), seconds=time.time() - self.start, resumed=self.resumed), f)

    def failure(self):
        with open(os.path.join(self.run_dir, 'train.log')) as f:
            lines = [line.strip() for line in f if line.strip()]
        return f'Training {self.name} failed (exit status {self.process.returncode}): {lines[-1] if lines else "no output"}; see {os.path.join(self.run_dir, "train.log")}'

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
        self.poll()

def finished_model(run_dir):
    """(snapshot path, marker) of a finished model, or None."""
    path = os.path.join(run_dir, FINISHED)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        marker = json.load(f)
    return os.path.join(run_dir, marker['snapshot']), marker

#----------------------------------------------------------------------------

def recorded_path(path):
    """A path inside this repository relative to it (so study.json stays valid in another checkout), others absolute."""
    path, repo = os.path.abspath(path), os.path.dirname(TRAIN_SCRIPT)
    return os.path.relpath(path, repo) if os.path.commonpath([path, repo]) == repo else path

class Study:
    def __init__(self, data, outdir, sizes, widths, kimg, batch, lr, num_seeds, num_steps, split_seed=0, train_seed=0,
        jobs=2, device=torch.device('cpu'), sample_batch=64, sscd_model=None, cres=(1, 2, 2)):
        self.outdir = os.path.abspath(outdir) # train.py runs in the repository folder.
        self.jobs, self.device, self.sample_batch = jobs, torch.device(device), sample_batch
        self.config = dict(data=recorded_path(data), sizes=sorted(set(sizes)), widths=sorted(set(widths)), kimg=kimg, batch=batch, lr=lr,
            num_seeds=num_seeds, num_steps=num_steps, split_seed=split_seed, train_seed=train_seed, arch='ddpmpp', cres=list(cres),
            descriptor=('mean-centred pixel cosine similarity' if sscd_model is None else f'SSCD {sscd_model}'))
        self.path = os.path.join(outdir, 'study.json')
        self.results = self._load_previous()
        try:
            self.images, _names = load_images(data)
        except dataset_lib.DatasetError as e:
            raise StudyError(str(e)) from e
        self.subsets, self.held_out = nested_split(len(self.images), self.config['sizes'], split_seed)
        self.seeds = list(range(num_seeds))
        try:
            self.describe = pixel_descriptors if sscd_model is None else sscd_descriptors(sscd_model, self.device)
        except feature_detectors.DetectorError as e:
            raise StudyError(str(e)) from e

    def _load_previous(self):
        if not os.path.isfile(self.path):
            return dict(config=self.config, subsets={}, descriptors={}, models={}, pairs={}, jacobian={})
        try:
            with open(self.path) as f:
                previous = json.load(f)
            previous_config = previous['config']
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StudyError(f'{self.path} is not a study.json this study can read ({type(e).__name__}: {e}); move it away to start afresh') from e
        current = json.loads(json.dumps(self.config))
        if previous_config != current:
            changed = [f'{k} {previous_config.get(k)} -> {current.get(k)}' for k in sorted(set(current) | set(previous_config)) if previous_config.get(k) != current.get(k)]
            raise StudyError(f'{self.outdir} holds a study with other settings ({"; ".join(changed)}); give the same settings to continue it, or another --outdir')
        return previous

    def _save(self):
        with dnnlib.util.atomic_write(self.path, mode='w') as f:
            json.dump(self.results, f, indent=2)

    def subset_path(self, size):
        return os.path.join(self.outdir, 'data', f'subset-{size:05d}.zip')

    def samples_path(self, name):
        return os.path.join(self.outdir, 'images', f'{name}.npz')

    def run_dir(self, size, width):
        return os.path.join(self.outdir, 'models', model_name(size, width))

    def _save_samples(self, name, samples):
        with dnnlib.util.atomic_write(self.samples_path(name)) as f:
            np.savez(f, samples=samples, seeds=np.asarray(self.seeds, dtype=np.int64))

    def _load_samples(self, name):
        with np.load(self.samples_path(name)) as npz:
            return npz['samples']

    #------------------------------------------------------------------------

    def prepare(self):
        """Subset zips, calibrated thresholds, the descriptor check, the optimal denoisers' samples."""
        os.makedirs(self.outdir, exist_ok=True)
        self._save()
        held_out = self.images[self.held_out]
        for size in self.config['sizes']:
            if not os.path.isfile(self.subset_path(size)):
                write_subset_zip(self.images[self.subsets[size]], self.subset_path(size))
            key = str(size)
            if key in self.results['subsets']:
                continue
            training = self.images[self.subsets[size]]
            threshold = calibrate_threshold(self.describe(training), self.describe(held_out))
            denoiser = optimal_denoiser_lib.OptimalDenoiser(torch.as_tensor(training)).to(self.device)
            samples = generate_samples(denoiser, self.seeds, self.config['num_steps'], self.sample_batch, self.device)
            self._save_samples(f'optimal-n{size:05d}', samples)
            self.results['subsets'][key] = dict(size=size, held_out=len(self.held_out), threshold=threshold,
                optimal=memorization_scores(samples, training, threshold, self.describe))
            self._save()
        if set(self.results['descriptors']) != {str(size) for size in self.config['sizes']}:
            self.results['descriptors'] = {str(size): self.compare_descriptors(size) for size in self.config['sizes']}
            self._save()

    def compare_descriptors(self, size):
        """Pixel descriptor vs the bundled digit detector's features (for 1x16x16 data), on one subset."""
        from training import bundled
        training, held_out = self.images[self.subsets[size]], self.images[self.held_out]
        checks = dict(pixels=descriptor_check(pixel_descriptors, training, held_out))
        if self.describe is not pixel_descriptors:
            checks['sscd'] = descriptor_check(self.describe, training, held_out)
        if os.path.isfile(bundled.DETECTOR) and list(self.images.shape[1:]) == [1, 16, 16]:
            detector = feature_detectors.load_feature_detector(bundled.DETECTOR, [1, 16, 16], device=self.device, verbose=False)
            describe = lambda images: torch.cat([detector(torch.as_tensor(images[i:i + 256]).to(self.device)).cpu() for i in range(0, len(images), 256)]).to(torch.float64)
            checks['bundled_detector'] = descriptor_check(describe, training, held_out)
        return checks

    def pending_models(self):
        return [(size, width) for size in self.config['sizes'] for width in self.config['widths']
            if finished_model(self.run_dir(size, width)) is None]

    def measure(self, size, width):
        """M score and RP score against the optimal denoiser of one finished model."""
        name = model_name(size, width)
        if name in self.results['models']:
            return
        snapshot, marker = finished_model(self.run_dir(size, width))
        net = checkpoint.load_network(snapshot, verbose=False).to(self.device).eval()
        samples = generate_samples(net, self.seeds, self.config['num_steps'], self.sample_batch, self.device)
        self._save_samples(name, samples)
        subset = self.results['subsets'][str(size)]
        entry = dict(size=size, width=width, snapshot=os.path.relpath(snapshot, self.outdir), train_seconds=marker['seconds'], resumed=marker['resumed'],
            **memorization_scores(samples, self.images[self.subsets[size]], subset['threshold'], self.describe),
            rp_optimal=rp_score(samples, self._load_samples(f'optimal-n{size:05d}'), subset['threshold'], self.describe))
        self.results['models'][name] = entry
        self._save()

    def measure_pairs(self):
        widths = self.config['widths']
        for size in self.config['sizes']:
            for a, b in zip(widths[:-1], widths[1:]):
                key = f'{model_name(size, a)}/{model_name(size, b)}'
                if key in self.results['pairs'] or not all(model_name(size, w) in self.results['models'] for w in (a, b)):
                    continue
                threshold = self.results['subsets'][str(size)]['threshold']
                self.results['pairs'][key] = dict(size=size, widths=[a, b],
                    rp=rp_score(self._load_samples(model_name(size, a)), self._load_samples(model_name(size, b)), threshold, self.describe))
                self._save()

    def jacobian_targets(self):
        """(key, size, width or None) for the widest model of the smallest and largest subsets, and their optimal denoisers."""
        sizes = sorted({min(self.config['sizes']), max(self.config['sizes'])})
        width = max(self.config['widths'])
        return [t for size in sizes for t in ((model_name(size, width), size, width), (f'optimal-n{size:05d}', size, None))]

    def measure_jacobian(self, key, size, width):
        if key in self.results['jacobian']:
            return
        if width is None:
            denoiser = optimal_denoiser_lib.OptimalDenoiser(torch.as_tensor(self.images[self.subsets[size]]))
        else:
            denoiser = checkpoint.load_network(finished_model(self.run_dir(size, width))[0], verbose=False)
        ranks = trajectory_ranks(denoiser.to(self.device).eval(), self.config['num_steps'], seed=0, device=self.device)
        self.results['jacobian'][key] = dict(size=size, width=width, steps=ranks)
        self._save()

    #------------------------------------------------------------------------

    def run(self, progress=True):
        """Prepare, train (up to `jobs` at once), measure each model as it finishes, then the pairs and Jacobians."""
        self.prepare()
        pending = self.pending_models()
        all_models = [(s, w) for s in self.config['sizes'] for w in self.config['widths']]
        targets = self.jacobian_targets()
        total = 2 * len(all_models) + len(targets)
        bar = tqdm.tqdm(total=total, desc='generalization study', disable=not progress)
        bar.update(len(all_models) - len(pending))
        measured = set()
        def measure_ready():
            for size, width in all_models:
                if (size, width) not in measured and finished_model(self.run_dir(size, width)) is not None:
                    self.measure(size, width)
                    self.measure_pairs()
                    self.write_outputs() # A killed study leaves the table of the models it finished.
                    measured.add((size, width))
                    bar.update(1)
                    return True
            return False

        running = []
        try:
            def launch():
                while pending and len(running) < self.jobs:
                    size, width = pending.pop(0)
                    run_dir = self.run_dir(size, width)
                    running.append(Training(model_name(size, width), train_command(self.subset_path(size), run_dir, width, self.config, self.device.type), run_dir))
            while pending or running:
                launch()
                for training in list(running):
                    rc = training.poll()
                    if rc is None:
                        continue
                    running.remove(training)
                    if rc != 0:
                        raise StudyError(training.failure())
                    training.finish()
                    bar.update(1)
                launch() # Before measuring, which takes minutes on a loaded machine: keep `jobs` trainings busy.
                if not measure_ready():
                    time.sleep(1)
        finally:
            for training in running:
                training.stop()
        while measure_ready():
            pass
        self.measure_pairs()
        for key, size, width in targets:
            self.measure_jacobian(key, size, width)
            bar.update(1)
        bar.close()
        self.write_outputs()
        return self.results

    #------------------------------------------------------------------------

    def table_rows(self):
        rows = []
        for name, m in sorted(self.results['models'].items(), key=lambda kv: (kv[1]['size'], kv[1]['width'])):
            pairs = [p['rp'] for p in self.results['pairs'].values() if p['size'] == m['size'] and m['width'] in p['widths']]
            subset = self.results['subsets'][str(m['size'])]
            rows.append(dict(size=m['size'], width=m['width'], threshold=subset['threshold'], m_score=m['m_score'], copy_fraction=m['copy_fraction'],
                rp_optimal=m['rp_optimal'], rp_other_width=(float(np.mean(pairs)) if pairs else None), train_seconds=m['train_seconds']))
        return rows

    def write_outputs(self):
        rows = self.table_rows()
        fmt = lambda v: '' if v is None else (f'{v:.4f}' if isinstance(v, float) else str(v))
        columns = ['size', 'width', 'threshold', 'm_score', 'copy_fraction', 'rp_optimal', 'rp_other_width', 'train_seconds']
        with dnnlib.util.atomic_write(os.path.join(self.outdir, 'table.csv'), mode='w') as f:
            f.write(','.join(columns) + '\n')
            for row in rows:
                f.write(','.join(fmt(row[c]) for c in columns) + '\n')
        with dnnlib.util.atomic_write(os.path.join(self.outdir, 'summary.md'), mode='w') as f:
            f.write(summary_markdown(self.results, rows))
        plot_scores(rows, os.path.join(self.outdir, 'scores.png'))
        plot_jacobian(self.results['jacobian'], os.path.join(self.outdir, 'jacobian.png'))

#----------------------------------------------------------------------------

def summary_markdown(results, rows):
    c = results['config']
    lines = [f'Training-set sizes {", ".join(map(str, c["sizes"]))} (nested, split seed {c["split_seed"]}), widths (--cbase) '
        f'{", ".join(map(str, c["widths"]))}, {c["kimg"]:g} kimg at batch {c["batch"]}, lr {c["lr"]:g}; {c["num_seeds"]} seeds, '
        f'Heun {c["num_steps"]} steps. Descriptor: {c["descriptor"]}; threshold = the largest nearest-training similarity of the '
        f'{next(iter(results["subsets"].values()))["held_out"] if results["subsets"] else "?"} held-out images.', '',
        'M score = 1 - fraction of samples that copy a training image (0 = all copies). RP = fraction of seeds on which two '
        'samplers give the same image (similarity above the threshold).', '',
        '| images | width | threshold | M score | copies | RP vs optimal denoiser | RP between widths | training s |',
        '|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        other = f'{r["rp_other_width"]:.3f}' if r['rp_other_width'] is not None else '-'
        lines.append(f'| {r["size"]} | {r["width"]} | {r["threshold"]:.4f} | {r["m_score"]:.3f} | {r["copy_fraction"]:.3f} | '
            f'{r["rp_optimal"]:.3f} | {other} | {r["train_seconds"]:.0f} |')
    if results['subsets']:
        lines += ['', 'Optimal denoiser of each subset (it memorizes by construction): '
            + ', '.join(f'n={s["size"]}: M {s["optimal"]["m_score"]:.3f}' for s in results['subsets'].values())]
    if results['descriptors']:
        lines += ['', 'Descriptor check: noisy copies (noise std '
            f'{NOISY_COPY_STD} on 0-255) of each subset\'s training images against its calibrated threshold. Relative margin = '
            'margin / (1 - threshold), comparable between descriptors that crowd similarities near 1 to different degrees.', '',
            '| images | descriptor | threshold | smallest noisy-copy similarity | margin | relative margin | noisy copies flagged |',
            '|---:|---|---:|---:|---:|---:|---:|']
        for size, checks in sorted(results['descriptors'].items(), key=lambda kv: int(kv[0])):
            for name, d in checks.items():
                lines.append(f'| {size} | {name} | {d["threshold"]:.5f} | {d["min_noisy_copy_similarity"]:.5f} | {d["margin"]:+.5f} | '
                    f'{d["relative_margin"]:+.3f} | {d["noisy_copies_flagged"]:.3f} |')
    if results['jacobian']:
        lines += ['', 'Jacobian rank (99% energy) along the trajectory of seed 0, from high to low noise:', '']
        for key, j in results['jacobian'].items():
            lines.append(f'- {key}: ' + ' '.join(str(s['rank']) for s in j['steps']))
    return '\n'.join(lines) + '\n'

def _save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png')
    plt.close(fig)

def plot_scores(rows, path):
    """M score, RP vs the optimal denoiser and RP between widths against training-set size, a line per width."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    panels = [('m_score', 'M score (1 - copy fraction)'), ('rp_optimal', 'RP vs optimal denoiser'), ('rp_other_width', 'RP between widths')]
    widths = sorted({r['width'] for r in rows})
    for ax, (key, title) in zip(axes, panels):
        # RP between widths is one number per subset (for two widths); draw it once.
        lines = [(w, f'cbase {w} vs {", ".join(map(str, widths[1:]))}' if len(widths) == 2 else f'cbase {w} vs the others')
            for w in widths[:1]] if key == 'rp_other_width' else [(w, f'cbase {w}') for w in widths]
        for width, label in lines:
            points = [(r['size'], r[key]) for r in rows if r['width'] == width and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker='o', label=label)
        ax.set_xscale('log', base=2)
        sizes = sorted({r['size'] for r in rows})
        if sizes:
            ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel('training images')
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save_figure(fig, path)

def plot_jacobian(jacobian, path):
    """Rank against SNR for each measured model next to the optimal denoiser of its subset."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sizes = sorted({j['size'] for j in jacobian.values()})
    fig, axes = plt.subplots(1, max(len(sizes), 1), figsize=(5 * max(len(sizes), 1), 3.6), dpi=110, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for key, j in jacobian.items():
            if j['size'] == size:
                label = 'optimal denoiser' if j['width'] is None else f'network cbase {j["width"]}'
                ax.plot([s['snr'] for s in j['steps']], [s['rank'] for s in j['steps']], marker='o', label=label,
                    linestyle='--' if j['width'] is None else '-')
        ax.set_xscale('log')
        ax.set_xlabel('SNR 1/sigma')
        ax.set_ylabel('Jacobian rank')
        ax.set_title(f'{size} training images', fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _save_figure(fig, path)

#----------------------------------------------------------------------------

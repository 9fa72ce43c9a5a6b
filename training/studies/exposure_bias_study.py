"""The exposure-bias study of a network: epsilon-norm curves, calibrated scalers, and an FD table.

For each sampler setting (by default Euler 13 steps and Heun 18 steps, as in Ning et al.'s tables):
  1. the epsilon-norm curves, consecutive sampling vs single step on training images, and the
     variance error (exposure_bias_metrics.measure), before and after calibration;
  2. the calibrated constant and linear scalers (exposure_bias_metrics.calibrate);
  3. the Frechet distance of generated images to the reference statistics, over a list of
     eps_scaler values plus the calibrated one, each without and with time shift (the paper's rule:
     EDM's discretization is not the uniform 1000-step grid the released rule needs).
Every FD comes with a 95% bootstrap interval over seed blocks (training/evaluation/fid_uncertainty.py), and
every setting is compared with the plain sampler (eps_scaler 1, no time shift) of the same sampler
setting on the same seeds, with the paired interval of the difference; the summary's conclusions
come from those intervals only. Two yardsticks put the FD differences in scale: the FD of the plain
sampler on a second, disjoint set of seeds (with its unpaired difference), and the FD of as many
real training images. Per-image features are kept in features/ for reanalysis (fid.py compare).

Every finished measurement is stored in study.json at once, so a killed study continues where it
stopped when run again with the same settings (inputs are identified by their sha256). A folder that
holds a study with other settings, or an unreadable study.json, is refused (StudyFolderError) unless
the caller asks to start over.
"""

import json
import os

import numpy as np
import torch
import tqdm

import dnnlib
from training.evaluation import exposure_bias_metrics as metrics
from training.evaluation import fid_uncertainty
from training.sampling import generation
from training.sampling import time_shift as time_shift_lib

#----------------------------------------------------------------------------

SAMPLER_SETTINGS = {
    'euler-13': dict(num_steps=13, solver='euler'),
    'heun-18':  dict(num_steps=18),
}

def network_evaluations(sampler_kwargs):
    steps = sampler_kwargs['num_steps']
    return steps if sampler_kwargs.get('solver') == 'euler' else 2 * steps - 1

#----------------------------------------------------------------------------

class StudyFolderError(ValueError):
    """The output folder holds a study that cannot be continued with these settings."""

class Study:
    def __init__(self, net, images, labels, detector, ref_mu, ref_sigma, outdir,
        num_images=400, num_calibration=128, calibration_rounds=3, eps_scalers=(1.0, 1.003, 1.006, 1.010),
        cutoff=300, window=80, batch_size=128, device=torch.device('cpu'), settings=SAMPLER_SETTINGS, inputs=None, restart=False):
        """inputs: what identifies the network, data, reference and detector (e.g. their sha256); a
        study in `outdir` continues only when these and every setting match. restart: start over."""
        self.net, self.images, self.labels = net, images, labels
        self.detector, self.ref_mu, self.ref_sigma = detector, ref_mu, ref_sigma
        self.outdir = outdir
        self.num_images, self.num_calibration, self.calibration_rounds = num_images, num_calibration, calibration_rounds
        self.eps_scalers = [float(s) for s in eps_scalers]
        self.cutoff, self.window = cutoff, window
        self.batch_size, self.device = batch_size, device
        self.settings = settings
        self.num_blocks = min(fid_uncertainty.DEFAULT_BLOCKS, num_images // 2)
        self.config = dict(num_images=num_images, num_calibration=num_calibration, calibration_rounds=calibration_rounds,
            eps_scalers=self.eps_scalers, cutoff=cutoff, window=window, settings=settings, inputs=inputs,
            calibration_tolerance=metrics.CONVERGENCE_TOLERANCE,
            blocks=self.num_blocks, resamples=fid_uncertainty.DEFAULT_RESAMPLES)
        self.reference = fid_uncertainty.ReferenceRoot(ref_mu, ref_sigma)
        self.path = os.path.join(outdir, 'study.json')
        self.kept_entries = None # Entries of an earlier run that are kept; None for a new study.
        self.results = self._load_previous(restart)

    def _load_previous(self, restart):
        """Results of an earlier run with the same settings; batch size and device do not change them."""
        fresh = dict(config=self.config, calibration={}, fd=[], yardsticks={})
        if restart or not os.path.isfile(self.path):
            return fresh
        try:
            with open(self.path) as f:
                previous = json.load(f)
            recorded = previous['config']
            assert isinstance(recorded, dict) and isinstance(previous['fd'], list)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise StudyFolderError(f'{self.path} is not a readable study ({e.__class__.__name__}); '
                f'move it away, or add --restart to start this folder over') from None
        current = json.loads(json.dumps(self.config))
        if recorded != current:
            differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
            raise StudyFolderError(f'{self.outdir} holds a study with other settings ({", ".join(differ)} differ); '
                f'give a new --outdir, or add --restart to start this one over')
        previous.setdefault('calibration', {})
        previous.setdefault('yardsticks', {})
        self.kept_entries = len(previous['calibration']) + len(previous['fd']) + len(previous['yardsticks'])
        return previous

    def _save(self):
        os.makedirs(self.outdir, exist_ok=True)
        with dnnlib.util.atomic_write(self.path, mode='w') as f:
            json.dump(self.results, f, indent=2)

    #------------------------------------------------------------------------

    def fd_with_interval(self, feature_set):
        num_blocks = min(self.num_blocks, len(feature_set) // 2)
        result = fid_uncertainty.fid_with_interval(feature_set, self.reference, num_blocks=num_blocks, fid_inf_fractions=None)
        return dict(fd=result['fid'], ci=result['ci'])

    def features_path(self, name, eps_scaler, time_shift):
        return os.path.join(self.outdir, 'features', f'{name}{"-time-shift" if time_shift else ""}-eps{eps_scaler:.5f}.npz')

    def generated_features(self, sampler_kwargs, seeds, eps_scaler, time_shift):
        kwargs = dict(sampler_kwargs)
        if time_shift:
            kwargs['time_shift'] = time_shift_lib.TimeShift(time_shift_lib.TrainingGrid.for_network(self.net),
                num_steps=kwargs['num_steps'], cutoff=self.cutoff, window=self.window, rule='paper')
        features = [self.detector(torch.as_tensor(batch.images).permute(0, 3, 1, 2)).cpu()
            for batch in generation.generate_images(self.net, seeds, self.batch_size, device=self.device,
                sampler_kwargs=kwargs, corrections=generation.Corrections(eps_scaler=eps_scaler))]
        return torch.cat(features)

    def calibrate(self, name, sampler_kwargs):
        if name in self.results['calibration']:
            return self.results['calibration'][name]
        seeds = list(range(self.num_calibration))
        images, labels = self.images[:self.num_calibration], (self.labels[:self.num_calibration] if self.labels is not None else None)
        fitted, history, measured = metrics.calibrate(self.net, images, labels, seeds, sampler_kwargs, self.calibration_rounds, self.batch_size, self.device)
        plain, calibrated = measured['plain'], measured['calibrated']
        metrics.save_curves(plain, self.outdir, name=f'eps_norm_{name}')
        metrics.save_curves(calibrated, self.outdir, name=f'eps_norm_{name}_calibrated')
        label = 'calibrated' if fitted['converged'] else 'not converged, best'
        metrics.plot_curves({'eps_scaler=1': plain, f'{label} eps_scaler={fitted["eps_scaler"]:.4f}': calibrated},
            os.path.join(self.outdir, f'eps_norm_{name}.png'), title=f'{name.replace("-", " ")} steps')
        entry = dict(fitted, history=history,
            mean_ratio_plain=float(np.mean(np.array(plain['eps_norm_consecutive']) / np.array(plain['eps_norm_single_step']))),
            mean_ratio_calibrated=float(np.mean(np.array(calibrated['eps_norm_consecutive_scaled']) / np.array(calibrated['eps_norm_single_step']))),
            max_variance_error_plain=float(np.max(np.abs(plain['variance_error']))),
            max_variance_error_calibrated=float(np.max(np.abs(calibrated['variance_error']))))
        self.results['calibration'][name] = entry
        self._save()
        if not fitted['converged']:
            tqdm.tqdm.write(f'{name}: {metrics.describe_calibration(fitted)}')
        return entry

    def fd_runs(self):
        """(setting name, eps_scaler, time shift) of every FD entry; the calibrated scaler needs calibrate() first."""
        runs = []
        for name in self.settings:
            calibrated = round(self.results['calibration'][name]['eps_scaler'], 5)
            for time_shift in (False, True):
                for eps_scaler in sorted(set(self.eps_scalers + [calibrated])):
                    runs.append((name, eps_scaler, time_shift))
        return runs

    def run(self, progress=True):
        for name, sampler_kwargs in tqdm.tqdm(self.settings.items(), desc='calibration', disable=not progress):
            self.calibrate(name, sampler_kwargs)
        seeds = list(range(self.num_images))
        # An entry counts as done only with its features file, which the paired comparisons need.
        self.results['fd'] = [e for e in self.results['fd'] if os.path.isfile(self.features_path(e['setting'], e['eps_scaler'], e['time_shift']))]
        done = {(e['setting'], e['eps_scaler'], e['time_shift']) for e in self.results['fd']}
        for name, eps_scaler, time_shift in tqdm.tqdm(self.fd_runs(), desc='FD table', disable=not progress):
            if (name, eps_scaler, time_shift) in done:
                continue
            features = fid_uncertainty.FeatureSet(self.generated_features(self.settings[name], seeds, eps_scaler, time_shift).numpy(), seeds)
            fid_uncertainty.save_features(self.features_path(name, eps_scaler, time_shift), features)
            calibration = self.results['calibration'][name]
            calibrated = calibration['converged'] and abs(eps_scaler - round(calibration['eps_scaler'], 5)) < 1e-12
            self.results['fd'].append(dict(setting=name, nfe=network_evaluations(self.settings[name]), eps_scaler=eps_scaler,
                time_shift=time_shift, calibrated=calibrated, **self.fd_with_interval(features)))
            self._save()
        self.compare_with_plain()
        self.yardsticks(progress)
        self.write_outputs()
        return self.results

    def compare_with_plain(self):
        """Each entry against eps_scaler 1 without time shift of its sampler, paired over the same seeds."""
        for e in self.results['fd']:
            if e['eps_scaler'] == 1.0 and not e['time_shift']:
                continue
            plain = fid_uncertainty.load_features(self.features_path(e['setting'], 1.0, False))
            other = fid_uncertainty.load_features(self.features_path(e['setting'], e['eps_scaler'], e['time_shift']))
            e['vs_plain'] = self.comparison(plain, other)
        self._save()

    def comparison(self, plain, other, unpaired=False):
        c = fid_uncertainty.paired_comparison(plain, other, self.reference, num_blocks=self.num_blocks, unpaired=unpaired)
        return dict(difference=c['difference'], ci=c['ci'], excludes_zero=c['excludes_zero'], better_fraction=c['b_better_fraction'], paired=c['paired'])

    def yardsticks(self, progress=True):
        sticks = self.results['yardsticks']
        if 'plain_other_seeds' not in sticks:
            name = next(iter(self.settings))
            seeds = list(range(self.num_images, 2 * self.num_images))
            other = fid_uncertainty.FeatureSet(self.generated_features(self.settings[name], seeds, 1.0, False).numpy(), seeds)
            plain = fid_uncertainty.load_features(self.features_path(name, 1.0, False))
            sticks['plain_other_seeds'] = dict(setting=name, **self.fd_with_interval(other), vs_plain=self.comparison(plain, other, unpaired=True))
            self._save()
        if 'training_images' not in sticks:
            n = min(self.num_images, len(self.images))
            features = torch.cat([self.detector(torch.as_tensor(self.images[i:i + self.batch_size])).cpu() for i in range(0, n, self.batch_size)])
            sticks['training_images'] = dict(num=n, **self.fd_with_interval(fid_uncertainty.FeatureSet(features.numpy())))
            self._save()

    #------------------------------------------------------------------------

    def write_outputs(self):
        rows = self.results['fd']
        with dnnlib.util.atomic_write(os.path.join(self.outdir, 'fd_table.csv'), mode='w') as f:
            f.write('setting,nfe,time_shift,eps_scaler,calibrated,fd,fd_lo,fd_hi,diff_vs_plain,diff_lo,diff_hi,diff_excludes_0\n')
            for e in rows:
                c = e.get('vs_plain', dict(difference=0.0, ci=[0.0, 0.0], excludes_zero=False))
                f.write(f'{e["setting"]},{e["nfe"]},{int(e["time_shift"])},{e["eps_scaler"]:.5f},{int(e["calibrated"])},{e["fd"]:.6f},'
                    f'{e["ci"][0]:.6f},{e["ci"][1]:.6f},{c["difference"]:.6f},{c["ci"][0]:.6f},{c["ci"][1]:.6f},{int(c["excludes_zero"])}\n')
        with dnnlib.util.atomic_write(os.path.join(self.outdir, 'summary.md'), mode='w') as f:
            f.write(summary_markdown(self.results))
        plot_fd(rows, os.path.join(self.outdir, 'fd.png'), self.results['yardsticks'])

#----------------------------------------------------------------------------

def entry_name(e):
    return f'{e["setting"]}{" + time shift" if e["time_shift"] else ""}, eps_scaler {e["eps_scaler"]:.5f}{" (calibrated)" if e["calibrated"] else ""}'

def conclusions(results):
    """Sentences that follow from the paired intervals alone: which settings differ from the plain sampler."""
    compared = [e for e in results['fd'] if 'vs_plain' in e]
    better = [e for e in compared if e['vs_plain']['ci'][1] < 0]
    worse = [e for e in compared if e['vs_plain']['ci'][0] > 0]
    lines = []
    for label, entries in (('lower (better) FD than', better), ('higher (worse) FD than', worse)):
        if entries:
            lines.append(f'- {len(entries)} of {len(compared)} settings have a {label} the plain sampler of their column, '
                f'their 95% paired interval excluding 0: ' + '; '.join(f'{entry_name(e)} {e["vs_plain"]["difference"]:+.3f} '
                f'[{e["vs_plain"]["ci"][0]:+.3f}, {e["vs_plain"]["ci"][1]:+.3f}]' for e in entries) + '.')
    rest = len(compared) - len(better) - len(worse)
    if rest:
        lines.append(f'- For the other {rest} of {len(compared)} settings the paired interval includes 0: these data do not show them '
            f'to differ from the plain sampler.')
    sticks = results.get('yardsticks', {})
    if 'plain_other_seeds' in sticks and 'vs_plain' in sticks['plain_other_seeds']:
        c = sticks['plain_other_seeds']['vs_plain']
        lines.append(f'- The plain sampler on other seeds differs from itself by {c["difference"]:+.3f} [{c["ci"][0]:+.3f}, {c["ci"][1]:+.3f}] '
            f'(unpaired): the seed-to-seed noise that a paired comparison removes.')
    return lines

def summary_markdown(results):
    """The tables README shows: calibrated scalers, FD per eps_scaler with its interval, paired differences, conclusions."""
    cfg = results['config']
    lines = [f'Calibration ({cfg["num_calibration"]} trajectories, {cfg["calibration_rounds"]} rounds):', '',
        '| sampler | eps norm ratio consecutive/single-step, plain | calibrated eps_scaler | linear fit (eps_scaler, kappa) | ratio after calibration | max abs variance error, plain -> calibrated |',
        '| --- | --- | --- | --- | --- | --- |']
    for name, c in results['calibration'].items():
        scaler = f'{c["eps_scaler"]:.4f}' if c.get('converged', True) else f'not converged (best {c["eps_scaler"]:.4f}, abs h {abs(c["residual"]):.1e})'
        lines.append(f'| {name} | {c["mean_ratio_plain"]:.4f} | {scaler} | {c["linear_eps_scaler"]:.4f}, {c["linear_kappa"]:+.5f} | '
            f'{c["mean_ratio_calibrated"]:.4f} | {100 * c["max_variance_error_plain"]:.2f}% -> {100 * c["max_variance_error_calibrated"]:.2f}% |')
    settings = list(dict.fromkeys(e['setting'] for e in results['fd']))
    columns = [(s, ts) for s in settings for ts in (False, True)]
    header = '| eps_scaler | ' + ' | '.join(f'{s}{" + time shift" if ts else ""}' for s, ts in columns) + ' |'
    table = {(e['setting'], e['time_shift'], e['eps_scaler']): e for e in results['fd']}
    scalers = sorted({e['eps_scaler'] for e in results['fd']})
    blocks = f'{cfg.get("blocks", "?")} seed blocks, {cfg.get("resamples", "?")} resamples'

    def rows(cell):
        out = [header, '| --- ' * (len(columns) + 1) + '|']
        for eps_scaler in scalers:
            cells = [cell(table.get((s, ts, eps_scaler))) for s, ts in columns]
            out.append(f'| {eps_scaler:.5f} | ' + ' | '.join(cells) + ' |')
        return out

    lines += ['', f'FD to the reference statistics, with 95% bootstrap intervals ({cfg["num_images"]} images each, {blocks}; '
        f'time shift: paper rule, cutoff {cfg["cutoff"]}, window {cfg["window"]}; * = calibrated):', '']
    lines += rows(lambda e: '' if e is None else f'{e["fd"]:.3f}{"*" if e["calibrated"] else ""} [{e["ci"][0]:.3f}, {e["ci"][1]:.3f}]')

    def diff_cell(e):
        if e is None:
            return ''
        if 'vs_plain' not in e:
            return 'plain'
        c = e['vs_plain']
        return f'{c["difference"]:+.3f} [{c["ci"][0]:+.3f}, {c["ci"][1]:+.3f}]{" **excl. 0**" if c["excludes_zero"] else ""}'
    lines += ['', f'FD minus that of the plain sampler (eps_scaler 1, no time shift) of the same sampler, paired over the same seeds, '
        f'95% interval; **excl. 0** = the interval excludes 0:', '']
    lines += rows(diff_cell)
    sticks = results.get('yardsticks', {})
    if sticks:
        lines.append('')
        if 'plain_other_seeds' in sticks:
            y = sticks['plain_other_seeds']
            lines.append(f'Yardstick: {y["setting"]}, eps_scaler 1, on {cfg["num_images"]} other seeds: FD {y["fd"]:.3f} [{y["ci"][0]:.3f}, {y["ci"][1]:.3f}].')
        if 'training_images' in sticks:
            y = sticks['training_images']
            lines.append(f'Yardstick: {y["num"]} real training images: FD {y["fd"]:.3f} [{y["ci"][0]:.3f}, {y["ci"][1]:.3f}].')
    lines += ['', 'Conclusions (from the paired 95% intervals only):', ''] + conclusions(results)
    return '\n'.join(lines) + '\n'

def plot_fd(rows, path, yardsticks={}):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for setting in dict.fromkeys(e['setting'] for e in rows):
        for time_shift, style in ((False, '-'), (True, '--')):
            line = sorted((e['eps_scaler'], e['fd'], *e.get('ci', [e['fd'], e['fd']])) for e in rows if e['setting'] == setting and e['time_shift'] == time_shift)
            if line:
                x, y, lo, hi = map(np.array, zip(*line))
                ax.errorbar(x, y, yerr=np.maximum([y - lo, hi - y], 0), fmt=style, marker='o', capsize=2, label=f'{setting}{" + time shift" if time_shift else ""}')
    if 'plain_other_seeds' in yardsticks:
        ax.axhline(yardsticks['plain_other_seeds']['fd'], color='gray', lw=0.8, ls='-.', label=f'{yardsticks["plain_other_seeds"]["setting"]}, other seeds')
    if 'training_images' in yardsticks:
        ax.axhline(yardsticks['training_images']['fd'], color='gray', lw=0.8, ls=':', label='real training images')
    ax.set_xlabel('eps_scaler')
    ax.set_ylabel('FD with 95% interval')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=110)
    plt.close(fig)

#----------------------------------------------------------------------------

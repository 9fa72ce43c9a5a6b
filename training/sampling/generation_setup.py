"""What a generate.py run samples with, from its options: the denoiser, the sampler settings and the
exposure-bias corrections, loaded and checked, and the record of them written beside the images.

    options = dnnlib.EasyDict(...)   # generate.py's options, by parameter name (presets.apply_preset first).
    setup = generation_setup.from_options(options, device)
    for batch in generation.generate_images(setup.net, seeds, ..., sampler_kwargs=setup.sampler_kwargs,
            corrections=setup.corrections):
        ...
"""

import dataclasses

from torch_utils import distributed as dist
from training import run_record
from training.guidance import discriminator_guidance as dg_lib
from training.sampling import epsilon_scaling
from training.sampling import generation
from training.sampling import sampler as sampler_lib
from training.sampling import time_shift as time_shift_lib

#----------------------------------------------------------------------------

# generate.py's options that are sampler keywords (edm_sampler / ablation_sampler, sampler.py).
SAMPLER_OPTIONS = ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise',
    'solver', 'discretization', 'schedule', 'scaling')

@dataclasses.dataclass
class GenerationSetup:
    net:            object              # The denoiser: a network, a MoLRG or an optimal denoiser, on the device.
    source:         str                 # The file it came from.
    sampler_kwargs: dict                # Sampler keywords (None means default), with the TimeShift under 'time_shift'.
    corrections:    generation.Corrections

    @property
    def time_shift(self):
        return self.sampler_kwargs.get('time_shift')

def from_options(options, device):
    """Load the denoiser (and discriminator guidance) that `options` name and check the sampler
    settings and corrections against it.

    options -- generate.py's options by parameter name, with dg_weight_1st_order resolved
               (1.67 with a discriminator, see generate.py). The sampler keywords keep their order.
    ValueError with a readable reason for settings that cannot be served; checkpoint.CheckpointError,
    dataset.DatasetError and GuidanceCheckpointError from loading.
    """
    net, source = generation.load_denoiser(options.network_pkl, options.molrg_path, options.optimal_denoiser, options.dataset_path, options.class_idx)
    sampler_kwargs = {name: value for name, value in options.items() if name in SAMPLER_OPTIONS}
    if options.optimal_denoiser and sampler_kwargs.get('solver') is None:
        sampler_kwargs['solver'] = 'euler' # Zhang et al. take no 2nd order correction with it.
    guidance = load_guidance(net, options.discriminator_ckpt, options.pretrained_classifier_ckpt, options.cond,
        options.time_min, options.time_max) if options.discriminator_ckpt else None
    net = net.to(device)
    if guidance is not None:
        guidance.to(device)
    generation.check_class(net, options.class_idx)
    epsilon_scaling.check_eps_scaler(options.eps_scaler, options.kappa, sampler_kwargs['num_steps'])
    if options.do_time_shift:
        sampler_kwargs['time_shift'] = time_shift_lib.from_options(net, sampler_kwargs, options.ts_rule, options.cutoff, options.window)
    corrections = generation.Corrections(eps_scaler=options.eps_scaler, kappa=options.kappa, guidance=guidance,
        guidance_cond=bool(options.cond), dg_weight_1st_order=options.dg_weight_1st_order,
        dg_weight_2nd_order=options.dg_weight_2nd_order, boosting=bool(options.boosting))
    return GenerationSetup(net=net, source=source, sampler_kwargs=sampler_kwargs, corrections=corrections)

def load_guidance(net, discriminator_ckpt, classifier_ckpt, cond, time_min, time_max):
    """The discriminator guidance of the two state dicts, checked against the network."""
    if cond and not net.label_dim:
        raise ValueError('--cond=1 needs a class-conditional network, but this one is unconditional')
    dist.print0(f'Loading classifier from "{classifier_ckpt}" and discriminator from "{discriminator_ckpt}"...')
    classifier = dg_lib.load_classifier(classifier_ckpt, net.img_resolution, net.img_channels)
    discriminator = dg_lib.load_discriminator(discriminator_ckpt, classifier, cond)
    return dg_lib.DiscriminatorGuidance(classifier, discriminator, net.img_resolution, time_min=time_min, time_max=time_max)

#----------------------------------------------------------------------------

def settings_record(setup, options, device):
    """Everything that changes the images, as used (preset expanded), for <outdir>-settings.json."""
    sampler = {k: v for k, v in setup.sampler_kwargs.items() if k != 'time_shift'}
    sigma_steps = [float(s) for s in sampler_lib.plan_from_settings(setup.net, sampler).sigma_steps.tolist()] # What --sigma_min/--sigma_max/--rho resolve to.
    sampler['sampler'] = 'generalized (ablation)' if sampler_lib.uses_ablation_sampler(sampler) else 'edm'
    sampler['sigma_steps'] = sigma_steps
    denoiser = ('optimal denoiser' if options.optimal_denoiser else 'MoLRG denoiser' if options.molrg_path else 'network')
    ts = setup.time_shift
    time_shift = dict(rule=ts.rule, cutoff=ts.cutoff, window=ts.window) if ts is not None else None
    guidance = options.discriminator_ckpt and dict(discriminator_ckpt=run_record.file_record(options.discriminator_ckpt),
        pretrained_classifier_ckpt=run_record.file_record(options.pretrained_classifier_ckpt),
        dg_weight_1st_order=options.dg_weight_1st_order, dg_weight_2nd_order=options.dg_weight_2nd_order,
        time_min=options.time_min, time_max=options.time_max, boosting=options.boosting, cond=options.cond)
    return dict(tool='generate.py', denoiser=denoiser, denoiser_class=type(setup.net).__name__, network=run_record.file_record(setup.source),
        network_given=options.network_pkl, preset=options.preset, seeds=generation.format_seeds(options.seeds), num_images=len(options.seeds),
        class_idx=options.class_idx, subdirs=options.subdirs, npz=options.npz, batch=options.max_batch_size, device=str(device),
        sampler=sampler, eps_scaling=dict(eps_scaler=options.eps_scaler, kappa=options.kappa), time_shift=(time_shift or None),
        discriminator_guidance=(guidance or None))

#----------------------------------------------------------------------------

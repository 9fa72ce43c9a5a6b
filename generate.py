"""Generate images with an EDM-format network pickle, with optional exposure-bias corrections.

Flags and outputs are those of NVIDIA EDM's generate.py (for the same pickle and seeds the images
are identical), plus epsilon scaling (--eps_scaler, --kappa), time-shift sampling
(--do_time_shift, --cutoff, --window, --ts_rule), discriminator guidance (--discriminator_ckpt,
--pretrained_classifier_ckpt, --dg_weight_1st_order, ...; docs/guidance.md), the optimal denoiser
of a dataset (--optimal_denoiser), named presets (--preset) and .npz output for npz-based FID tools
(--npz). Run as `python generate.py ...` or `torchrun --nproc_per_node=N generate.py ...`.
"""

import os

import click
import tqdm

from torch_utils import distributed as dist
from training import checkpoint
from training import cli_checks
from training import dataset
from training.guidance import discriminator_guidance as dg_lib
from training.sampling import epsilon_scaling
from training.sampling import generation
from training.evaluation import exposure_bias_metrics as metrics
from training.sampling import presets
from training import run_record
from training.sampling import sampler as sampler_lib
from training.sampling import time_shift as time_shift_lib

#----------------------------------------------------------------------------

class SeedList(click.ParamType):
    name = 'list'

    def convert(self, value, param, ctx):
        try:
            cli_checks.memory_fits(64 * cli_checks.seed_list_size(value), f'The seed list "{value}"', 'give fewer seeds')
            seeds = generation.parse_seeds(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        except click.ClickException as e:
            self.fail(e.message, param, ctx)
        if seeds and max(seeds) >= 1 << 63:
            self.fail(f'seed {max(seeds)} is too large (seeds are 64-bit integers)', param, ctx)
        return seeds

def list_presets(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo(presets.preset_table())
        ctx.exit()

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option('--network', 'network_pkl',  help='Network pickle filename  [default: the bundled digits model]', metavar='PATH|URL', type=str, show_default=False)
@click.option('--outdir',                  help='Where to save the output images', metavar='DIR',                   type=str, required=True)
@click.option('--seeds',                   help='Random seeds (e.g. 1,2,5-10)', metavar='LIST',                     type=SeedList(), default='0-63')
@click.option('--subdirs',                 help='Create subdirectory for every 1000 seeds',                         is_flag=True)
@click.option('--class', 'class_idx',      help='Class label  [default: random]', metavar='INT',                    type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT',                                type=click.IntRange(min=1), default=64)
@click.option('--device',                  help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu', type=click.Choice(['cuda', 'cpu']), default=None, show_default=False)
@click.option('--resume',                  help='Skip seeds whose image (or --npz file) already exists in --outdir', is_flag=True)
@click.option('--npz',                     help='Write samples_*.npz files (uint8 "samples", one-hot "label") instead of PNGs', is_flag=True)
@click.option('--grid',                    help='Write a grid of the first 256 seeds here  [default: <outdir>-grid.png, beside --outdir, when at most 256 seeds]', metavar='PNG', type=str, default=None, show_default=False)
@click.option('--no-grid', 'no_grid',      help='Write no grid', is_flag=True)

@click.option('--steps', 'num_steps',      help='Number of sampling steps', metavar='INT',                          type=click.IntRange(min=1), default=18)
@click.option('--sigma_min',               help='Lowest noise level  [default: varies]', metavar='FLOAT',           type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max',               help='Highest noise level  [default: varies]', metavar='FLOAT',          type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',                     help='Time step exponent', metavar='FLOAT',                              type=click.FloatRange(min=0, min_open=True), default=7)
@click.option('--S_churn', 'S_churn',      help='Stochasticity strength', metavar='FLOAT',                          type=click.FloatRange(min=0), default=0)
@click.option('--S_min', 'S_min',          help='Stoch. min noise level', metavar='FLOAT',                          type=click.FloatRange(min=0), default=0)
@click.option('--S_max', 'S_max',          help='Stoch. max noise level', metavar='FLOAT',                          type=click.FloatRange(min=0), default='inf')
@click.option('--S_noise', 'S_noise',      help='Stoch. noise inflation', metavar='FLOAT',                          type=float, default=1)

@click.option('--solver',                  help='Ablate ODE solver', metavar='euler|heun',                          type=click.Choice(['euler', 'heun']))
@click.option('--disc', 'discretization',  help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm', type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule',                help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear',           type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling',                 help='Ablate signal scaling s(t)', metavar='vp|none',                    type=click.Choice(['vp', 'none']))

@click.option('--eps_scaler',              help='Epsilon scaling: divide the predicted noise by this (1 = off)', metavar='FLOAT', type=float, default=1.0)
@click.option('--kappa',                   help='Epsilon scaling: scaler at step i is eps_scaler + kappa*i', metavar='FLOAT', type=float, default=0.0)
@click.option('--do_time_shift',           help='Time-shift sampling (TS-DPM)',                                     is_flag=True)
@click.option('--cutoff',                  help='Time shift: no shift at or below this index of the 1000-step grid', metavar='INT', type=int, default=300)
@click.option('--window',                  help='Time shift: search window, in steps of the 1000-step grid', metavar='INT', type=int, default=80)
@click.option('--ts_rule',                 help='Time shift: the authors\' released code or the paper\'s rule', metavar='auto|released|paper', type=click.Choice(['auto', 'released', 'paper']), default='auto',
    show_default='auto: released for Euler on a VP/iDDPM network with --disc=vp|iddpm, else paper')

@click.option('--discriminator_ckpt',      help='Discriminator guidance: discriminator state dict (discriminator_*.pt)', metavar='PT', type=str)
@click.option('--pretrained_classifier_ckpt', help='Discriminator guidance: ADM feature classifier (32x32_classifier.pt)', metavar='PT', type=str)
@click.option('--dg_weight_1st_order',     help='Discriminator guidance weight of the Euler evaluation  [default: 1.67 with --discriminator_ckpt, else 0]', metavar='FLOAT', type=click.FloatRange(min=0), show_default=False)
@click.option('--dg_weight_2nd_order',     help='Discriminator guidance weight of the 2nd-order evaluation', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0)
@click.option('--time_min',                help='Discriminator guidance: lowest VP time [0, 1] guided', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.01)
@click.option('--time_max',                help='Discriminator guidance: highest VP time [0, 1] guided', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=1.0)
@click.option('--boosting',                help='Discriminator guidance: boost samples with log ratio < 0 (DG\'s boosting)', metavar='0|1', type=click.IntRange(min=0, max=1), default=0)
@click.option('--cond',                    help='Discriminator guidance: the discriminator is class-conditional', metavar='0|1', type=click.IntRange(min=0, max=1), default=0)

@click.option('--optimal_denoiser',        help='Sample with the closed-form denoiser of --dataset, not a network',  is_flag=True)
@click.option('--dataset', 'dataset_path', help='Images of the optimal denoiser', metavar='ZIP|DIR',                 type=str)
@click.option('--molrg', 'molrg_path',     help='Sample with the exact denoiser of a MoLRG dataset file, not a network', metavar='PT', type=str)
@click.option('--preset',                  help='Named settings, see --list-presets; explicit flags override them', metavar='NAME', type=click.Choice(list(presets.PRESETS)), show_choices=False)
@click.option('--list-presets',            help='Print the presets and exit', is_flag=True, expose_value=False, is_eager=True, callback=list_presets)

@click.pass_context
def main(ctx, network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, device, resume, npz, grid, no_grid,
    eps_scaler, kappa, do_time_shift, cutoff, window, ts_rule, discriminator_ckpt, pretrained_classifier_ckpt,
    dg_weight_1st_order, dg_weight_2nd_order, time_min, time_max, boosting, cond, optimal_denoiser, dataset_path, molrg_path, preset,
    **sampler_kwargs):
    """Generate random images with EDM's samplers and exposure-bias corrections.

    Examples:

    \b
    # 64 images in out/ (only the images), out-grid.png and out-settings.json beside it; bundled digits model
    python generate.py --outdir=out --seeds=0-63

    \b
    # 50k images for FID on 2 GPUs; after a crash, the same command with --resume continues
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs --resume \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # Epsilon scaling, Heun 18 steps (35 NFE), as EDM-ES
    torchrun --standalone --nproc_per_node=1 generate.py --outdir=out --batch 512 --steps=18 --seeds=0-49999 \\
        --eps_scaler=1.0006 --network=edm-cifar10-32x32-cond-vp.pkl

    \b
    # The same by name; --list-presets shows all of the paper's settings
    python generate.py --outdir=out --seeds=0-49999 --preset=edm-es-cifar10-cond-heun-nfe35

    \b
    # Time shift (the paper's rule) with epsilon scaling on EDM's Heun sampler
    python generate.py --outdir=out --do_time_shift --ts_rule=paper --eps_scaler=1.0006 --network=net.pkl

    \b
    # SEDM-G++: discriminator guidance with epsilon scaling, .npz output for npz-based FID tools
    torchrun --standalone --nproc_per_node=2 generate.py --network=edm-cifar10-32x32-uncond-vp.pkl \\
        --outdir=generated_samples --seeds=0-49999 --npz --discriminator_ckpt=discriminator_60.pt \\
        --pretrained_classifier_ckpt=32x32_classifier.pt --eps_scaler=1.004 --dg_weight_1st_order=1.67

    \b
    # The optimal denoiser of a dataset instead of a network (Euler steps, as Zhang et al.)
    python generate.py --outdir=out --seeds=0-63 --optimal_denoiser --dataset=datasets/cifar10-32x32.zip

    \b
    # Samples of a low-rank Gaussian mixture from its exact denoiser (trainMoLRG.py writes the file)
    python generate.py --outdir=out --seeds=0-63 --molrg=datasets/MoLRG_dataset_resolution4_classnum2_perclassdim7_sample350.pt
    """
    # A preset fills in whatever was not given on the command line.
    if preset is not None:
        values = presets.PRESETS[preset]
        given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        network_pkl = network_pkl if given('network_pkl') else values.network
        eps_scaler = eps_scaler if given('eps_scaler') else values.eps_scaler
        sampler_kwargs['num_steps'] = sampler_kwargs['num_steps'] if given('num_steps') else values.steps
        if values.solver == 'euler' and not given('solver'):
            sampler_kwargs['solver'] = 'euler'

    # Bad input is answered before anything is loaded or written (training/cli_checks.py).
    cli_checks.output_folder(outdir)
    cli_checks.device_available(device)
    for name, value in [('--eps_scaler', eps_scaler), ('--kappa', kappa), ('--S_noise', sampler_kwargs['S_noise']),
            ('--dg_weight_1st_order', dg_weight_1st_order), ('--dg_weight_2nd_order', dg_weight_2nd_order)]:
        cli_checks.finite(value, name)
    cli_checks.ordered(sampler_kwargs['sigma_min'], sampler_kwargs['sigma_max'], '--sigma_min', '--sigma_max')
    cli_checks.ordered(sampler_kwargs['S_min'], sampler_kwargs['S_max'], '--S_min', '--S_max')
    cli_checks.expect_kind(network_pkl, '--network', cli_checks.NETWORK_KINDS)
    for name, value in [('--discriminator_ckpt', discriminator_ckpt), ('--pretrained_classifier_ckpt', pretrained_classifier_ckpt), ('--molrg', molrg_path)]:
        cli_checks.expect_kind(value, name, cli_checks.STATE_DICT_KINDS)
    seeds = cli_checks.unique_seeds(seeds)

    dg_weight_1st_order = check_guidance_flags(discriminator_ckpt, pretrained_classifier_ckpt, dg_weight_1st_order, dg_weight_2nd_order,
        time_min, time_max, boosting, cond)
    if boosting and do_time_shift:
        raise click.ClickException('--boosting adds churn per sample, which --do_time_shift does not support; use one of them')
    if npz and (subdirs or grid):
        raise click.ClickException('--npz writes samples_*.npz files; --subdirs and --grid work with PNG output only')
    if grid is not None and no_grid:
        raise click.ClickException('--grid=PNG and --no-grid contradict each other; give one')
    try:
        run_record.check_outdir(outdir)
    except ValueError as e:
        raise click.ClickException(str(e))
    grid_path = grid if grid is not None else (None if no_grid or npz or len(seeds) > 256 else run_record.beside(outdir, '-grid.png'))
    grid_folder, image_folder = os.path.dirname(os.path.abspath(grid_path or '.')), os.path.abspath(outdir)
    if grid_path is not None and (grid_folder == image_folder or grid_folder.startswith(image_folder + os.sep)):
        raise click.ClickException(f'--grid={grid} is inside --outdir, which must hold the images only; put the grid beside it')

    device = dist.init(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Load the network: downloads once per machine, then every rank loads (and reads --dataset) in parallel.
    dist.download_first_on_rank0(network_pkl)
    try:
        net, _source = generation.load_denoiser(network_pkl, molrg_path, optimal_denoiser, dataset_path, class_idx)
        if optimal_denoiser and sampler_kwargs.get('solver') is None:
            sampler_kwargs['solver'] = 'euler' # Zhang et al. take no 2nd order correction with it.
        guidance = load_guidance(net, discriminator_ckpt, pretrained_classifier_ckpt, cond, time_min, time_max) if discriminator_ckpt else None
    except (ValueError, checkpoint.CheckpointError, dataset.DatasetError, dg_lib.GuidanceCheckpointError) as e:
        raise click.ClickException(str(e))
    net = net.to(device)
    if guidance is not None:
        guidance.to(device)
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.ClickException(f'--class={class_idx} is out of range: the network has {net.label_dim} classes' if net.label_dim
            else f'--class={class_idx} given, but the network is unconditional')

    # Exposure-bias corrections: checked now, applied per batch.
    try:
        epsilon_scaling.check_eps_scaler(eps_scaler, kappa, sampler_kwargs['num_steps'])
        if do_time_shift:
            solver = sampler_kwargs.get('solver') or 'heun'
            discretization = sampler_kwargs.get('discretization') or 'edm'
            ts_rule = time_shift_lib.choose_rule(ts_rule, solver, discretization, net)
            dist.print0(f'Time shift: the {ts_rule} rule (--ts_rule={ts_rule}), cutoff {cutoff}, window {window}')
            time_shift_lib.check_time_shift(ts_rule, cutoff, window, solver, discretization, net)
            if sampler_kwargs['S_churn'] != 0:
                raise ValueError('--do_time_shift works with deterministic sampling only; leave --S_churn at 0')
            sampler_kwargs['time_shift'] = time_shift_lib.TimeShift(time_shift_lib.TrainingGrid.for_network(net),
                num_steps=sampler_kwargs['num_steps'], cutoff=cutoff, window=window, rule=ts_rule)
    except ValueError as e:
        raise click.ClickException(str(e))

    corrections = generation.Corrections(eps_scaler=eps_scaler, kappa=kappa, guidance=guidance, guidance_cond=bool(cond),
        dg_weight_1st_order=dg_weight_1st_order, dg_weight_2nd_order=dg_weight_2nd_order, boosting=bool(boosting))

    # Seeds still to do.
    todo = seeds
    if resume and npz:
        try:
            done = generation.seeds_in_npz_files(outdir)
        except ValueError as e:
            raise click.ClickException(str(e))
        todo = [seed for seed in seeds if seed not in done]
    elif resume:
        todo = [seed for seed in seeds if not cli_checks.image_decodes(generation.image_path(outdir, seed, subdirs))]
    if resume:
        dist.print0(f'Resuming: {len(seeds) - len(todo)} of {len(seeds)} images already exist')
        dist.barrier() # Every rank must see the same files, so no rank may write before all have looked.

    # What changes the images, beside the folder (it holds the images only).
    if rank == 0:
        run_record.write_settings(run_record.beside(outdir, '-settings.json'), generation_settings(
            net, _source, network_pkl, molrg_path, optimal_denoiser, dataset_path, preset, seeds, subdirs, class_idx, npz, max_batch_size, device,
            sampler_kwargs, eps_scaler, kappa, do_time_shift and dict(rule=ts_rule, cutoff=cutoff, window=window),
            discriminator_ckpt and dict(discriminator_ckpt=run_record.file_record(discriminator_ckpt),
                pretrained_classifier_ckpt=run_record.file_record(pretrained_classifier_ckpt), dg_weight_1st_order=dg_weight_1st_order,
                dg_weight_2nd_order=dg_weight_2nd_order, time_min=time_min, time_max=time_max, boosting=boosting, cond=cond)))

    # Generate and save.
    dist.print0(f'Generating {len(todo)} images to "{outdir}"...')
    batches = generation.generate_images(net, todo, max_batch_size=max_batch_size, class_idx=class_idx, device=device,
        sampler_kwargs=sampler_kwargs, corrections=corrections, rank=rank, world_size=world_size)
    num_batches = len(generation.rank_batches(todo, max_batch_size, rank, world_size))
    for batch in tqdm.tqdm(batches, total=num_batches, unit='batch', disable=(rank != 0)):
        if npz:
            generation.save_npz(generation.npz_path(outdir, batch.seeds), batch.images, batch.labels, net.label_dim, seeds=batch.seeds)
            continue
        for seed, image in zip(batch.seeds, batch.images):
            generation.save_image(generation.image_path(outdir, seed, subdirs), image)

    dist.barrier()
    if grid_path is not None and rank == 0:
        images = [generation.load_image(generation.image_path(outdir, seed, subdirs)) for seed in seeds[:256]]
        generation.save_image_grid(grid_path, images)
        dist.print0(f'Wrote the grid to "{grid_path}"')
    dist.print0('Done.')
    dist.shutdown()

#----------------------------------------------------------------------------

def generation_settings(net, source, network_pkl, molrg_path, optimal_denoiser, dataset_path, preset, seeds, subdirs, class_idx, npz,
    max_batch_size, device, sampler_kwargs, eps_scaler, kappa, time_shift, guidance):
    """Everything that changes the images, as used (preset expanded), for <outdir>-settings.json."""
    sampler = {k: v for k, v in sampler_kwargs.items() if k != 'time_shift'}
    sigma_steps = [float(s) for s in metrics.sampler_sigmas(net, sampler).tolist()] # What --sigma_min/--sigma_max/--rho resolve to.
    sampler['sampler'] = 'generalized (ablation)' if generation.uses_ablation_sampler(sampler) else 'edm'
    sampler['sigma_steps'] = sigma_steps
    denoiser = ('optimal denoiser' if optimal_denoiser else 'MoLRG denoiser' if molrg_path else 'network')
    return dict(tool='generate.py', denoiser=denoiser, denoiser_class=type(net).__name__, network=run_record.file_record(source),
        network_given=network_pkl, preset=preset, seeds=generation.format_seeds(seeds), num_images=len(seeds), class_idx=class_idx,
        subdirs=subdirs, npz=npz, batch=max_batch_size, device=str(device), sampler=sampler,
        eps_scaling=dict(eps_scaler=eps_scaler, kappa=kappa), time_shift=(time_shift or None), discriminator_guidance=(guidance or None))

def check_guidance_flags(discriminator_ckpt, classifier_ckpt, weight_1st, weight_2nd, time_min, time_max, boosting, cond):
    """Refuse inconsistent discriminator-guidance flags; returns the 1st-order weight to use."""
    if discriminator_ckpt is None:
        if weight_1st or weight_2nd:
            raise click.ClickException('--dg_weight_1st_order/--dg_weight_2nd_order need --discriminator_ckpt=PT and --pretrained_classifier_ckpt=PT')
        for name, value in [('--pretrained_classifier_ckpt', classifier_ckpt), ('--boosting', boosting), ('--cond', cond)]:
            if value:
                raise click.ClickException(f'{name} is for discriminator guidance; add --discriminator_ckpt=PT')
        return 0.0
    if classifier_ckpt is None:
        raise click.ClickException('--discriminator_ckpt needs --pretrained_classifier_ckpt=PT, the ADM classifier whose features it reads')
    if time_min > time_max:
        raise click.ClickException(f'--time_min={time_min} is above --time_max={time_max}; guidance would never apply')
    return 1.67 if weight_1st is None else weight_1st # SEDM-G++'s CIFAR-10 weight.

def load_guidance(net, discriminator_ckpt, classifier_ckpt, cond, time_min, time_max):
    """The discriminator guidance of the two state dicts, checked against the network."""
    if cond and not net.label_dim:
        raise click.ClickException('--cond=1 needs a class-conditional network, but this one is unconditional')
    dist.print0(f'Loading classifier from "{classifier_ckpt}" and discriminator from "{discriminator_ckpt}"...')
    classifier = dg_lib.load_classifier(classifier_ckpt, net.img_resolution, net.img_channels)
    discriminator = dg_lib.load_discriminator(discriminator_ckpt, classifier, cond)
    return dg_lib.DiscriminatorGuidance(classifier, discriminator, net.img_resolution, time_min=time_min, time_max=time_max)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Generate images with an EDM-format network pickle, with optional exposure-bias corrections.

Flags and outputs are those of NVIDIA EDM's generate.py (for the same pickle and seeds the images
are identical), plus epsilon scaling (--eps_scaler, --kappa), time-shift sampling
(--do_time_shift, --cutoff, --window, --ts_rule), discriminator guidance (--discriminator_ckpt,
--pretrained_classifier_ckpt, --dg_weight_1st_order, ...; docs/guidance.md), the optimal denoiser
of a dataset (--optimal_denoiser), named presets (--preset) and .npz output for npz-based FID tools
(--npz). Run as `python generate.py ...` or `torchrun --nproc_per_node=N generate.py ...`.
"""

import click
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training import cli_checks
from training import dataset
from training import run_record
from training.guidance import discriminator_guidance as dg_lib
from training.sampling import generation
from training.sampling import generation_setup
from training.sampling import presets

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
def main(ctx, **opts):
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
    given = [name for name in opts if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    opts = dnnlib.EasyDict(presets.apply_preset(opts['preset'], opts, given))

    # Bad input is answered before anything is loaded or written (training/cli_checks.py).
    check_values(opts)
    opts.seeds = cli_checks.unique_seeds(opts.seeds)
    opts.dg_weight_1st_order = check_guidance_flags(opts)
    check_combinations(opts)
    try:
        run_record.check_outdir(opts.outdir)
        grid_path = generation.grid_path(opts.outdir, opts.grid, len(opts.seeds), write_default=not (opts.no_grid or opts.npz))
    except ValueError as e:
        raise click.ClickException(str(e))

    device = dist.init(opts.device)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # The denoiser and its corrections: downloads once per machine, then every rank loads (and reads --dataset) in parallel.
    dist.download_first_on_rank0(opts.network_pkl)
    try:
        setup = generation_setup.from_options(opts, device)
        todo = generation.seeds_to_do(opts.seeds, opts.outdir, opts.subdirs, opts.npz) if opts.resume else opts.seeds
    except (ValueError, checkpoint.CheckpointError, dataset.DatasetError, dg_lib.GuidanceCheckpointError) as e:
        raise click.ClickException(str(e))
    if opts.resume:
        dist.print0(f'Resuming: {len(opts.seeds) - len(todo)} of {len(opts.seeds)} images already exist')
        dist.barrier() # Every rank must see the same files, so no rank may write before all have looked.

    # What changes the images, beside the folder (it holds the images only).
    if rank == 0:
        run_record.write_settings(run_record.beside(opts.outdir, '-settings.json'), generation_setup.settings_record(setup, opts, device))

    # Generate and save.
    dist.print0(f'Generating {len(todo)} images to "{opts.outdir}"...')
    batches = generation.generate_images(setup.net, todo, max_batch_size=opts.max_batch_size, class_idx=opts.class_idx, device=device,
        sampler_kwargs=setup.sampler_kwargs, corrections=setup.corrections, rank=rank, world_size=world_size)
    num_batches = len(generation.rank_batches(todo, opts.max_batch_size, rank, world_size))
    for batch in tqdm.tqdm(batches, total=num_batches, unit='batch', disable=(rank != 0)):
        generation.save_batch(batch, opts.outdir, opts.subdirs, opts.npz, setup.net.label_dim)

    dist.barrier()
    if grid_path is not None and rank == 0:
        generation.save_grid(grid_path, opts.outdir, opts.seeds, opts.subdirs)
        dist.print0(f'Wrote the grid to "{grid_path}"')
    dist.print0('Done.')
    dist.shutdown()

#----------------------------------------------------------------------------
# Flag checks: each refuses bad input in one line, before anything is loaded.

def check_values(opts):
    """Folders, devices, numbers and file kinds, one flag at a time."""
    cli_checks.output_folder(opts.outdir)
    cli_checks.device_available(opts.device)
    for name, value in [('--eps_scaler', opts.eps_scaler), ('--kappa', opts.kappa), ('--S_noise', opts.S_noise),
            ('--dg_weight_1st_order', opts.dg_weight_1st_order), ('--dg_weight_2nd_order', opts.dg_weight_2nd_order)]:
        cli_checks.finite(value, name)
    cli_checks.ordered(opts.sigma_min, opts.sigma_max, '--sigma_min', '--sigma_max')
    cli_checks.ordered(opts.S_min, opts.S_max, '--S_min', '--S_max')
    cli_checks.expect_kind(opts.network_pkl, '--network', cli_checks.NETWORK_KINDS)
    for name, value in [('--discriminator_ckpt', opts.discriminator_ckpt), ('--pretrained_classifier_ckpt', opts.pretrained_classifier_ckpt), ('--molrg', opts.molrg_path)]:
        cli_checks.expect_kind(value, name, cli_checks.STATE_DICT_KINDS)

def check_guidance_flags(opts):
    """Refuse inconsistent discriminator-guidance flags; returns the 1st-order weight to use."""
    if opts.discriminator_ckpt is None:
        if opts.dg_weight_1st_order or opts.dg_weight_2nd_order:
            raise click.ClickException('--dg_weight_1st_order/--dg_weight_2nd_order need --discriminator_ckpt=PT and --pretrained_classifier_ckpt=PT')
        for name, value in [('--pretrained_classifier_ckpt', opts.pretrained_classifier_ckpt), ('--boosting', opts.boosting), ('--cond', opts.cond)]:
            if value:
                raise click.ClickException(f'{name} is for discriminator guidance; add --discriminator_ckpt=PT')
        return 0.0
    if opts.pretrained_classifier_ckpt is None:
        raise click.ClickException('--discriminator_ckpt needs --pretrained_classifier_ckpt=PT, the ADM classifier whose features it reads')
    if opts.time_min > opts.time_max:
        raise click.ClickException(f'--time_min={opts.time_min} is above --time_max={opts.time_max}; guidance would never apply')
    return 1.67 if opts.dg_weight_1st_order is None else opts.dg_weight_1st_order # SEDM-G++'s CIFAR-10 weight.

def check_combinations(opts):
    """Flags that each work, but not together."""
    if opts.boosting and opts.do_time_shift:
        raise click.ClickException('--boosting adds churn per sample, which --do_time_shift does not support; use one of them')
    if opts.npz and (opts.subdirs or opts.grid):
        raise click.ClickException('--npz writes samples_*.npz files; --subdirs and --grid work with PNG output only')
    if opts.grid is not None and opts.no_grid:
        raise click.ClickException('--grid=PNG and --no-grid contradict each other; give one')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

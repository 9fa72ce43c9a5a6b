"""Named sampling settings, so that a paper's table can be reproduced by name (`generate.py --preset`).

Epsilon scaling on NVIDIA's EDM CIFAR-10 VP checkpoints with the tuned scalers of Ning et al.
(their EDM results in "Elucidating the Exposure Bias in Diffusion Models"). NFE counts network evaluations:
Heun takes 2 per step but one on the last, so steps = (NFE + 1) / 2; Euler takes 1, steps = NFE.
The FIDs are the paper's (50k images), plain EDM -> with epsilon scaling.
"""

import dnnlib

#----------------------------------------------------------------------------

EDM_CIFAR10 = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-{cond}-vp.pkl'

def _preset(cond, solver, nfe, eps_scaler, fid_edm, fid_es):
    steps = (nfe + 1) // 2 if solver == 'heun' else nfe
    return dnnlib.EasyDict(network=EDM_CIFAR10.format(cond=cond), solver=solver, steps=steps, eps_scaler=eps_scaler,
        nfe=nfe, fid_edm=fid_edm, fid_es=fid_es)

PRESETS = {
    f'edm-es-cifar10-{cond}-{solver}-nfe{nfe}': _preset(cond, solver, nfe, scaler, fid_edm, fid_es)
    for cond, solver, nfe, scaler, fid_edm, fid_es in [
        ('uncond', 'heun',  35, 1.0005,  1.97,  1.95),
        ('uncond', 'euler', 35, 1.0034,  3.81,  2.80),
        ('cond',   'heun',  35, 1.0006,  1.82,  1.80),
        ('cond',   'euler', 35, 1.0035,  3.74,  2.59),
        ('uncond', 'heun',  21, 0.9985,  2.33,  2.24),
        ('uncond', 'euler', 21, 1.0043,  6.29,  4.32),
        ('cond',   'heun',  21, 0.9983,  2.17,  2.08),
        ('cond',   'euler', 21, 1.0045,  5.91,  3.74),
        ('uncond', 'heun',  13, 1.0060,  7.16,  6.54),
        ('uncond', 'euler', 13, 1.0048, 12.28,  8.39),
        ('cond',   'heun',  13, 1.0070,  6.69,  6.16),
        ('cond',   'euler', 13, 1.0051, 10.66,  6.59),
    ]
}

def apply_preset(name, options, given=()):
    """`options` (generate.py's, by parameter name) with preset `name` filling in every setting it
    names that is not in `given`, the options set on the command line; a new dict, in the same order.

    A preset names the network, the scaler, the steps and the solver; Heun is the sampler's default,
    so a Heun preset leaves --solver unset (EDM's sampler, not the ablation sampler's Heun).
    """
    options = dict(options)
    if name is None:
        return options
    preset = PRESETS[name]
    for option, value in [('network_pkl', preset.network), ('eps_scaler', preset.eps_scaler), ('num_steps', preset.steps)]:
        if option not in given:
            options[option] = value
    if preset.solver == 'euler' and 'solver' not in given:
        options['solver'] = 'euler'
    return options

def preset_table():
    """The presets as printable lines."""
    lines = [f'{"preset":<36} {"solver":<6} {"steps":>5} {"NFE":>4} {"eps_scaler":>10}   FID EDM -> ES', '-' * 82]
    for name, p in PRESETS.items():
        lines.append(f'{name:<36} {p.solver:<6} {p.steps:>5} {p.nfe:>4} {p.eps_scaler:>10.4f}   {p.fid_edm:5.2f} -> {p.fid_es:5.2f}')
    lines.append('')
    lines.append('Networks: ' + EDM_CIFAR10.format(cond='{cond,uncond}') + '; FIDs as reported by Ning et al. (50k images).')
    return '\n'.join(lines)

#----------------------------------------------------------------------------

"""Denoiser networks: the DDPM++, NCSN++ and ADM U-Nets and EDM's four preconditioners.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS 2022),
Table 1. Build a denoiser as, e.g.,

    net = EDMPrecond(img_resolution=32, img_channels=3, model_type='SongUNet')
    denoised = net(x, sigma, class_labels)          # D(x; sigma), float32

The interface is that of NVIDIA's EDM release: the same class names, constructor arguments and
defaults, the same sub-module names (hence state_dict keys, in the same order), the same order of
random draws at construction, and the same floating-point operations. A network pickled by EDM
can therefore be rebuilt on these classes (training/checkpoint.py) and gives bit-identical outputs
and gradients on CPU float32.

How the code is organized:
- layers (Linear, Conv2d, GroupNorm) take their initial weights from the table INIT_SCALES;
- UNetBlock is the one residual block all three U-Nets are made of;
- unet_layout() writes a U-Net down as a plan, a list of (name, class, kwargs) per half; SongUNet
  and DhariwalUNet instantiate their plan, and run_unet() walks it with the stack of skips;
- each preconditioner only states its four coefficients c_skip, c_out, c_in, c_noise.

This module is embedded verbatim into every network pickle we write and NVIDIA's EDM executes it
when it loads such a pickle, so it imports nothing but numpy, torch and torch_utils.persistence.
"""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

#----------------------------------------------------------------------------
# Initial weights: w = scale(fan_in, fan_out) * u, with u uniform on [-1, 1) or
# standard normal. Xavier (Glorot & Bengio 2010) keeps the variance of both
# passes; Kaiming (He et al. 2015) that of the forward pass.

INIT_SCALES = {
    'xavier_uniform':   ('uniform', lambda fan_in, fan_out: np.sqrt(6 / (fan_in + fan_out))),
    'xavier_normal':    ('normal',  lambda fan_in, fan_out: np.sqrt(2 / (fan_in + fan_out))),
    'kaiming_uniform':  ('uniform', lambda fan_in, fan_out: np.sqrt(3 / fan_in)),
    'kaiming_normal':   ('normal',  lambda fan_in, fan_out: np.sqrt(1 / fan_in)),
}

def weight_init(shape, mode, fan_in, fan_out):
    """Random initial tensor of `shape` drawn as INIT_SCALES[mode] says (one draw from torch's RNG)."""
    if mode not in INIT_SCALES:
        raise ValueError(f'Unknown weight init mode "{mode}"; expected one of {", ".join(INIT_SCALES)}')
    distribution, scale = INIT_SCALES[mode]
    scale = scale(fan_in, fan_out)
    if distribution == 'uniform':
        return scale * (torch.rand(*shape) * 2 - 1)
    return scale * torch.randn(*shape)

def _as_dtype_of(x, tensor):
    """`tensor` cast to x's dtype (layers keep float32 parameters and follow their input's dtype)."""
    return None if tensor is None else tensor.to(x.dtype)

#----------------------------------------------------------------------------
# Layers.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self,
        in_features,                    # Input width.
        out_features,                   # Output width.
        bias        = True,             # Add a learned bias?
        init_mode   = 'kaiming_normal', # Key of INIT_SCALES.
        init_weight = 1,                # Factor on the initial weight.
        init_bias   = 0,                # Factor on the initial bias (drawn even when 0, to keep the RNG sequence).
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], init_mode, **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], init_mode, **fans) * init_bias) if bias else None

    def forward(self, x):
        y = x @ _as_dtype_of(x, self.weight).t()
        return y if self.bias is None else y.add_(_as_dtype_of(y, self.bias))

# 2x resampling by a separable FIR filter, one channel at a time. Upsampling
# inserts zeros, so its filter carries gain 4 to keep the mean.

def _upsample2x(x, kernel2d, padding):
    channels = x.shape[1]
    return torch.nn.functional.conv_transpose2d(x, kernel2d.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

def _downsample2x(x, kernel2d, padding):
    channels = x.shape[1]
    return torch.nn.functional.conv2d(x, kernel2d.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up- (before) or downsampling (after); kernel=0 only resamples."""

    def __init__(self,
        in_channels,                        # Input channels.
        out_channels,                       # Output channels.
        kernel,                             # Square kernel size; 0 = no convolution.
        bias            = True,             # Add a learned bias?
        up              = False,            # Upsample 2x first?
        down            = False,            # Downsample 2x afterwards?
        resample_filter = [1,1],            # 1D taps of the resampling filter.
        fused_resample  = False,            # Pad once around filter and kernel together (NCSN++'s residual path)?
        init_mode       = 'kaiming_normal', # Key of INIT_SCALES.
        init_weight     = 1,                # Factor on the initial weight.
        init_bias       = 0,                # Factor on the initial bias.
    ):
        assert not (up and down), 'a convolution resamples one way at most'
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        area = kernel * kernel
        fans = dict(fan_in=in_channels * area, fan_out=out_channels * area)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], init_mode, **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], init_mode, **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        kernel2d = torch.outer(taps, taps)[None, None] / taps.sum().square() # Unit gain at DC.
        self.register_buffer('resample_filter', kernel2d if (up or down) else None)

    def forward(self, x):
        weight = _as_dtype_of(x, self.weight)
        bias = _as_dtype_of(x, self.bias)
        kernel2d = _as_dtype_of(x, self.resample_filter)
        weight_pad = 0 if weight is None else weight.shape[-1] // 2
        filter_pad = 0 if kernel2d is None else (kernel2d.shape[-1] - 1) // 2
        fused = self.fused_resample and weight is not None
        if fused and self.up:
            x = _upsample2x(x, kernel2d, padding=max(filter_pad - weight_pad, 0))
            x = torch.nn.functional.conv2d(x, weight, padding=max(weight_pad - filter_pad, 0))
        elif fused and self.down:
            x = torch.nn.functional.conv2d(x, weight, padding=weight_pad + filter_pad)
            x = _downsample2x(x, kernel2d, padding=0)
        else:
            if self.up:
                x = _upsample2x(x, kernel2d, padding=filter_pad)
            if self.down:
                x = _downsample2x(x, kernel2d, padding=filter_pad)
            if weight is not None:
                x = torch.nn.functional.conv2d(x, weight, padding=weight_pad)
        return x if bias is None else x.add_(bias.reshape(1, -1, 1, 1))

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self,
        num_channels,                   # Channels of the input.
        num_groups              = 32,   # Groups wanted; fewer if a group would get under min_channels_per_group.
        min_channels_per_group  = 4,    # Smallest group.
        eps                     = 1e-5, # Added to the variance.
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, eps=self.eps,
            weight=_as_dtype_of(x, self.weight), bias=_as_dtype_of(x, self.bias))

#----------------------------------------------------------------------------
# Attention weights W = softmax_k(q . k / sqrt(C)) for q, k of shape [N, C, L].
# The logits and softmax are computed in float32 (float64 for float64 inputs)
# and W is returned in q's dtype. The backward pass keeps only q, k and W in
# that dtype, as NVIDIA EDM's AttentionOp does; plain autograd would also keep
# float32 copies of q and k and the float32 softmax, 59% more activation memory
# per sample for ADM-64 in fp16 (benchmarks/attention_memory.py). The vmap and
# jvp rules keep torch.func (jacrev, jvp, vmap) working, which jacobian.py needs.

def _wide(dtype):
    return torch.promote_types(dtype, torch.float32)

def _attention_logits(q, k):
    wide = _wide(q.dtype)
    return torch.einsum('ncq,nck->nqk', q.to(wide), (k / np.sqrt(k.shape[1])).to(wide))

class AttentionWeights(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k):
        return _attention_logits(q, k).softmax(dim=2).to(q.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k = inputs
        ctx.save_for_backward(q, k, output)
        ctx.save_for_forward(q, k, output)

    @staticmethod
    def backward(ctx, grad_weights):
        q, k, weights = ctx.saved_tensors
        wide = _wide(q.dtype)
        # d logits = W * (dW - sum_k W dW), the softmax's vector-Jacobian product; then the two
        # factors of the logits q . k / sqrt(C).
        grad_logits = torch._softmax_backward_data(grad_output=grad_weights.to(wide), output=weights.to(wide), dim=2, input_dtype=wide)
        grad_q = torch.einsum('nck,nqk->ncq', k.to(wide), grad_logits).to(q.dtype) / np.sqrt(k.shape[1])
        grad_k = torch.einsum('ncq,nqk->nck', q.to(wide), grad_logits).to(k.dtype) / np.sqrt(k.shape[1])
        return grad_q, grad_k

    @staticmethod
    def jvp(ctx, tangent_q, tangent_k):
        q, k, weights = ctx.saved_tensors
        # d logits = (dq . k + q . dk) / sqrt(C); dW = W * (d logits - sum_k W d logits).
        tangent_logits = _attention_logits(tangent_q, k) + _attention_logits(q, tangent_k)
        w = weights.to(_wide(q.dtype))
        tangent_w = w * (tangent_logits - (w * tangent_logits).sum(dim=2, keepdim=True))
        return tangent_w.to(q.dtype)

# PyTorch before 2.0 (EDM's own environment has 1.12) knows neither setup_context
# nor torch.func; there the same values come from plain ops, so that our pickles
# keep working in NVIDIA's code on old installations.
_FUNCTION_HAS_SETUP_CONTEXT = hasattr(torch.autograd.Function, 'setup_context')

def attention_weights(q, k):
    if not _FUNCTION_HAS_SETUP_CONTEXT:
        return _attention_logits(q, k).softmax(dim=2).to(q.dtype)
    return AttentionWeights.apply(q, k)

#----------------------------------------------------------------------------
# The residual block of all three U-Nets:
#   h = conv1(dropout(act(norm1(conv0(act(norm0(x)))) conditioned on emb)))
#   x = (h + skip(x)) * skip_scale, then optionally
#   x = (x + proj(attention(norm2(x)))) * skip_scale.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self,
        in_channels,                        # Input channels.
        out_channels,                       # Output channels.
        emb_channels,                       # Width of the noise/class embedding.
        up                  = False,        # Upsample 2x?
        down                = False,        # Downsample 2x?
        attention           = False,        # Self-attention after the residual branch?
        num_heads           = None,         # Attention heads; None = out_channels // channels_per_head.
        channels_per_head   = 64,           # Used when num_heads is None.
        dropout             = 0,            # Dropout probability before conv1.
        skip_scale          = 1,            # Factor after each residual sum.
        eps                 = 1e-5,         # GroupNorm epsilon.
        resample_filter     = [1,1],        # Taps for up/downsampling.
        resample_proj       = False,        # 1x1 convolution on the skip path even when only resampling?
        adaptive_scale      = True,         # Embedding gives a scale and a shift (True) or a shift only.
        init                = dict(),       # Initialization of most layers.
        init_zero           = dict(init_weight=0), # Of the last layer of each residual branch.
        init_attn           = None,         # Of the qkv convolution; None = init.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = out_channels // channels_per_head if num_heads is None else num_heads
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        affine_width = 2 * out_channels if adaptive_scale else out_channels

        # Sub-modules in the order of their state_dict keys (and of their random initial weights).
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resample, **init)
        self.affine = Linear(in_features=emb_channels, out_features=affine_width, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)
        self.skip = None
        if in_channels != out_channels or up or down:
            projects = resample_proj or in_channels != out_channels
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=int(projects), **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=3 * out_channels, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(silu(self.norm0(x)))
        h = self._condition(h, emb)
        h = self.conv1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
        x = h.add_(x if self.skip is None else self.skip(x)) * self.skip_scale
        if self.num_heads:
            x = self.proj(self._attend(self.norm2(x))).add_(x) * self.skip_scale
        return x

    def _condition(self, h, emb):
        """Bring in the embedding: h * (1 + scale) + shift after norm1 (adaptive), or h + shift before it."""
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            return silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        return silu(self.norm1(h.add_(params)))

    def _attend(self, x):
        """Multi-head self-attention over the pixels; heads become batch entries."""
        batch, channels = x.shape[:2]
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(batch * heads, channels // heads, 3, -1).unbind(2)
        w = attention_weights(q, k)
        return torch.einsum('nqk,nck->ncq', w, v).reshape(*x.shape)

#----------------------------------------------------------------------------
# Embeddings of the noise level: sinusoids at geometric frequencies (DDPM++,
# ADM; Vaswani et al. 2017) or at random frequencies (NCSN++; Tancik et al. 2020).

def _cos_sin(phase):
    return torch.cat([phase.cos(), phase.sin()], dim=1)

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels,               # Output width: num_channels/2 cosines, then as many sines.
        max_positions   = 10000,    # The lowest frequency is 1/max_positions.
        endpoint        = False,    # Reach the lowest frequency exactly (DDPM++) or stop one step short (ADM)?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(bool(self.endpoint)))
        freqs = (1 / self.max_positions) ** exponent
        return _cos_sin(torch.outer(x, freqs.to(x.dtype)))

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels,   # Output width: num_channels/2 cosines, then as many sines.
        scale = 16,     # Standard deviation of the frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        return _cos_sin(torch.outer(x, ((2 * np.pi) * self.freqs).to(x.dtype)))

def _drop_labels(labels, probability, x):
    """Zero each sample's class labels with the given probability (training for guidance-free sampling)."""
    keep = torch.rand([x.shape[0], 1], device=x.device) >= probability
    return labels * keep.to(labels.dtype)

#----------------------------------------------------------------------------
# U-Net plans. A plan is the encoder and the decoder as lists of
# (name, class, constructor kwargs); the names ("16x16_block0", "8x8_down",
# "32x32_aux_skip", ...) are the state_dict keys of NVIDIA's checkpoints, and
# the "aux" entries carry the extra image paths of Song et al.'s skip and
# residual encoders and skip decoder.

def unet_layout(
    img_resolution, in_channels, out_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
    block,                          # kwargs shared by every UNetBlock.
    init, init_zero,                # Initializations of the plain convolutions.
    stem_channels,                  # Output channels of the first convolution.
    decoder_attention,              # 'last': attention in a level's last decoder block only; 'all': in each.
    encoder_type    = 'standard',   # 'standard', 'skip' (add the downsampled image) or 'residual' (NCSN++).
    decoder_type    = 'standard',   # 'standard' or 'skip' (sum of per-level image outputs).
    output_head     = True,         # Put the norm + conv to out_channels in the decoder (SongUNet)?
    resample_filter = [1,1],        # Taps of the aux paths' resampling.
    aux_eps         = 1e-6,         # GroupNorm epsilon of the output head.
):
    encoder, decoder = [], []
    skip_widths = []            # Channels of each encoder output the decoder will concatenate.
    width = in_channels         # Channels of the main path so far.
    aux_width = in_channels     # Channels of the image path of the skip/residual encoder.
    top = len(channel_mult) - 1

    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        tag = f'{res}x{res}'
        if level == 0:
            encoder.append((f'{tag}_conv', Conv2d, dict(in_channels=width, out_channels=stem_channels, kernel=3, **init)))
            width = stem_channels
        else:
            encoder.append((f'{tag}_down', UNetBlock, dict(in_channels=width, out_channels=width, down=True, **block)))
            if encoder_type == 'skip':
                encoder.append((f'{tag}_aux_down', Conv2d, dict(in_channels=aux_width, out_channels=aux_width, kernel=0, down=True, resample_filter=resample_filter)))
                encoder.append((f'{tag}_aux_skip', Conv2d, dict(in_channels=aux_width, out_channels=width, kernel=1, **init)))
            elif encoder_type == 'residual':
                encoder.append((f'{tag}_aux_residual', Conv2d, dict(in_channels=aux_width, out_channels=width, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)))
                aux_width = width
        skip_widths.append(width)
        for index in range(num_blocks):
            encoder.append((f'{tag}_block{index}', UNetBlock, dict(in_channels=width, out_channels=model_channels * mult, attention=(res in attn_resolutions), **block)))
            width = model_channels * mult
            skip_widths.append(width)

    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        tag = f'{res}x{res}'
        if level == top:
            decoder.append((f'{tag}_in0', UNetBlock, dict(in_channels=width, out_channels=width, attention=True, **block)))
            decoder.append((f'{tag}_in1', UNetBlock, dict(in_channels=width, out_channels=width, **block)))
        else:
            decoder.append((f'{tag}_up', UNetBlock, dict(in_channels=width, out_channels=width, up=True, **block)))
        for index in range(num_blocks + 1):
            attention = res in attn_resolutions and (decoder_attention == 'all' or index == num_blocks)
            decoder.append((f'{tag}_block{index}', UNetBlock, dict(in_channels=width + skip_widths.pop(), out_channels=model_channels * mult, attention=attention, **block)))
            width = model_channels * mult
        if output_head and (decoder_type == 'skip' or level == 0):
            if decoder_type == 'skip' and level < top:
                decoder.append((f'{tag}_aux_up', Conv2d, dict(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)))
            decoder.append((f'{tag}_aux_norm', GroupNorm, dict(num_channels=width, eps=aux_eps)))
            decoder.append((f'{tag}_aux_conv', Conv2d, dict(in_channels=width, out_channels=out_channels, kernel=3, **init_zero)))
    return encoder, decoder, width

def build_plan(entries):
    """Instantiate a plan, in its order (which is also the order of the random initial weights)."""
    modules = torch.nn.ModuleDict()
    for name, cls, kwargs in entries:
        modules[name] = cls(**kwargs)
    return modules

def run_unet(encoder, decoder, x, emb):
    """Walk a built plan. Returns the main path's last features and the image of the output head.

    The main path pushes every encoder output onto a stack and the decoder pops one whenever a
    block wants more channels than the path has. The aux entries act on a second tensor: the
    downsampled image and residual sums in the encoder, the (upsampled) sum of per-level outputs
    in the decoder.
    """
    skips = []
    aux = x
    for name, module in encoder.items():
        role = name.split('_', 1)[1]
        if role == 'aux_down':
            aux = module(aux)
        elif role == 'aux_skip':
            x = skips[-1] = x + module(aux)
        elif role == 'aux_residual':
            x = skips[-1] = aux = (x + module(aux)) / np.sqrt(2)
        elif isinstance(module, UNetBlock):
            x = module(x, emb)
            skips.append(x)
        else:
            x = module(x)
            skips.append(x)

    image = None
    head = None
    for name, module in decoder.items():
        role = name.split('_', 1)[1]
        if role == 'aux_up':
            image = module(image)
        elif role == 'aux_norm':
            head = module(x)
        elif role == 'aux_conv':
            head = module(silu(head))
            image = head if image is None else head + image
        else:
            if x.shape[1] != module.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
    return x, image

#----------------------------------------------------------------------------
# DDPM++ and NCSN++ of Song et al., "Score-Based Generative Modeling through
# Stochastic Differential Equations" (ICLR 2021). DDPM++: embedding_type=
# 'positional', encoder_type='standard', resample_filter=[1,1]; NCSN++:
# 'fourier', 'residual', [1,3,3,1], channel_mult_noise=2.

SONG_UNET_CHOICES = dict(
    embedding_type  = ['positional', 'fourier'],
    encoder_type    = ['standard', 'skip', 'residual'],
    decoder_type    = ['standard', 'skip'],
)

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution of input and output.
        in_channels,                        # Input image channels.
        out_channels,                       # Output image channels.
        label_dim           = 0,            # Number of classes; 0 = unconditional.
        augment_dim         = 0,            # Width of the augmentation labels; 0 = none.

        model_channels      = 128,          # Channels at the first level.
        channel_mult        = [1,2,2,2],    # Channels of each level, in multiples of model_channels.
        channel_mult_emb    = 4,            # Embedding width, in multiples of model_channels.
        num_blocks          = 4,            # Residual blocks per level.
        attn_resolutions    = [16],         # Resolutions whose blocks have self-attention.
        dropout             = 0.10,         # Dropout probability in the blocks.
        label_dropout       = 0,            # Probability of dropping the class labels in training.

        embedding_type      = 'positional', # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise  = 1,            # Noise embedding width, in multiples of model_channels.
        encoder_type        = 'standard',   # 'standard' (DDPM++), 'residual' (NCSN++) or 'skip'.
        decoder_type        = 'standard',   # 'standard' or 'skip'.
        resample_filter     = [1,1],        # [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    ):
        for name, value in [('embedding_type', embedding_type), ('encoder_type', encoder_type), ('decoder_type', decoder_type)]:
            assert value in SONG_UNET_CHOICES[name], f'{name} must be one of {SONG_UNET_CHOICES[name]}, not {value!r}'
        super().__init__()
        self.label_dropout = label_dropout
        # Xavier-uniform everywhere; the last layer of each branch starts near zero (1e-5) and the
        # attention's qkv projection at sqrt(0.2), as in Song et al.'s code.
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init, init_weight=1e-5)
        noise_channels = model_channels * channel_mult_noise
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=dict(init, init_weight=np.sqrt(0.2)))

        # Embedding of noise level, class and augmentation.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        encoder, decoder, _ = unet_layout(img_resolution, in_channels, out_channels, model_channels, channel_mult,
            num_blocks, attn_resolutions, block=block, init=init, init_zero=init_zero, stem_channels=model_channels,
            decoder_attention='last', encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=resample_filter)
        self.enc = build_plan(encoder)
        self.dec = build_plan(decoder)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # Sines before cosines, as Song et al. order them.
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(labels, self.label_dropout, x)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        _, image = run_unet(self.enc, self.dec, x, emb)
        return image

#----------------------------------------------------------------------------
# ADM of Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis"
# (NeurIPS 2021), as EDM configures it.

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution of input and output.
        in_channels,                        # Input image channels.
        out_channels,                       # Output image channels.
        label_dim           = 0,            # Number of classes; 0 = unconditional.
        augment_dim         = 0,            # Width of the augmentation labels; 0 = none.

        model_channels      = 192,          # Channels at the first level.
        channel_mult        = [1,2,3,4],    # Channels of each level, in multiples of model_channels.
        channel_mult_emb    = 4,            # Embedding width, in multiples of model_channels.
        num_blocks          = 3,            # Residual blocks per level.
        attn_resolutions    = [32,16,8],    # Resolutions whose blocks have self-attention.
        dropout             = 0.10,         # Dropout probability in the blocks.
        label_dropout       = 0,            # Probability of dropping the class labels in training.
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        gain = np.sqrt(1/3) # Kaiming-uniform with this factor is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default.
        init = dict(init_mode='kaiming_uniform', init_weight=gain, init_bias=gain)
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Embedding of noise level, augmentation and class.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        encoder, decoder, width = unet_layout(img_resolution, in_channels, out_channels, model_channels, channel_mult,
            num_blocks, attn_resolutions, block=block, init=init, init_zero=init_zero,
            stem_channels=model_channels * channel_mult[0], decoder_attention='all', output_head=False)
        self.enc = build_plan(encoder)
        self.dec = build_plan(decoder)
        self.out_norm = GroupNorm(num_channels=width)
        self.out_conv = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(labels, self.label_dropout, x)
            emb = emb + self.map_label(labels)
        x, _ = run_unet(self.enc, self.dec, x, silu(emb))
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Preconditioning, EDM eq. 7 and Table 1:
#   D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).
# Each class below states its four coefficients; precondition() does the rest.
# Inputs are x at noise level sigma (no VP scaling); the result is float32.

def precondition(net, coefficients, x, sigma, class_labels, force_fp32, model_kwargs, out_channels=None):
    x = x.to(torch.float32)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    if net.label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, net.label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, net.label_dim)
    fp16 = net.use_fp16 and not force_fp32 and x.device.type == 'cuda'
    dtype = torch.float16 if fp16 else torch.float32

    c_skip, c_out, c_in, c_noise = coefficients(sigma)
    F_x = net.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
    assert F_x.dtype == dtype
    if out_channels is not None: # iDDPM's model also predicts variances; only the mean is used.
        F_x = F_x[:, :out_channels]
    return c_skip * x + c_out * F_x.to(torch.float32)

def _scalar(value):
    return torch.as_tensor(value)

def _setup(net, model_type, model_out_channels, model_kwargs, **settings):
    """Keep a preconditioner's settings as attributes and build its model F (the only random draws)."""
    for name, value in settings.items():
        setattr(net, name, value)
    net.model = globals()[model_type](img_resolution=net.img_resolution, in_channels=net.img_channels,
        out_channels=model_out_channels, label_dim=net.label_dim, **model_kwargs)

# VP (Song et al. 2021), EDM Table 1 column "VP":
#   sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1),
#   c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^-1(sigma).

@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Image channels.
        label_dim       = 0,            # Number of classes; 0 = unconditional.
        use_fp16        = False,        # Run the model in float16 on CUDA?
        beta_d          = 19.9,         # beta_d of the schedule (its extent).
        beta_min        = 0.1,          # beta_min of the schedule (its initial slope).
        M               = 1000,         # Discrete time steps the model was trained for.
        epsilon_t       = 1e-5,         # Smallest t in training.
        model_type      = 'SongUNet',   # Class name of the model F.
        **model_kwargs,                 # Constructor arguments of F.
    ):
        super().__init__()
        _setup(self, model_type, img_channels, model_kwargs,
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
            beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t)
        self.sigma_min = float(self.sigma(epsilon_t)) # sigma(t) over the trained range of t.
        self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return precondition(self, self.coefficients, x, sigma, class_labels, force_fp32, model_kwargs)

    def sigma(self, t):
        t = _scalar(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        # t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d.
        sigma = _scalar(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def round_sigma(self, sigma):
        return _scalar(sigma)

# VE (Song et al. 2021), EDM Table 1 column "VE": sigma(t) = sqrt(t),
#   c_skip = 1, c_out = sigma, c_in = 1, c_noise = log(sigma / 2).

@persistence.persistent_class
class VEPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Image channels.
        label_dim       = 0,            # Number of classes; 0 = unconditional.
        use_fp16        = False,        # Run the model in float16 on CUDA?
        sigma_min       = 0.02,         # Lowest noise level in training.
        sigma_max       = 100,          # Highest noise level in training.
        model_type      = 'SongUNet',   # Class name of the model F.
        **model_kwargs,                 # Constructor arguments of F.
    ):
        super().__init__()
        _setup(self, model_type, img_channels, model_kwargs,
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max)

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return precondition(self, self.coefficients, x, sigma, class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma):
        return _scalar(sigma)

# iDDPM (Nichol & Dhariwal 2021), EDM Table 1 column "iDDPM" and Appendix C.3.4:
# the model knows only the noise levels u_0 > ... > u_{M-1} of its cosine
# schedule, alpha_bar(j) = sin^2(pi j / (2 M (C_2 + 1))), with u_M = 0 and
#   u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1);
#   c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - argmin_j |u_j - sigma|.

@persistence.persistent_class
class iDDPMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Image channels.
        label_dim       = 0,                # Number of classes; 0 = unconditional.
        use_fp16        = False,            # Run the model in float16 on CUDA?
        C_1             = 0.001,            # Clip of alpha_bar ratios (low noise levels).
        C_2             = 0.008,            # Offset of the cosine schedule (high noise levels).
        M               = 1000,             # Number of discrete noise levels.
        model_type      = 'DhariwalUNet',   # Class name of the model F.
        **model_kwargs,                     # Constructor arguments of F.
    ):
        super().__init__()
        # F also predicts variances, hence twice the channels.
        _setup(self, model_type, 2 * img_channels, model_kwargs,
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16, C_1=C_1, C_2=C_2, M=M)

        u = torch.zeros(M + 1)
        for j in reversed(range(1, M + 1)):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def coefficients(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return precondition(self, self.coefficients, x, sigma, class_labels, force_fp32, model_kwargs, out_channels=self.img_channels)

    def alpha_bar(self, j):
        j = _scalar(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """The nearest of the levels u (or its index), in sigma's shape, dtype and device."""
        sigma = _scalar(sigma)
        distances = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = distances.argmin(2)
        nearest = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return nearest.reshape(sigma.shape).to(sigma.device)

# EDM's own (Table 1 column "EDM"), with s = sigma_data:
#   c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s / sqrt(sigma^2 + s^2),
#   c_in = 1 / sqrt(s^2 + sigma^2), c_noise = log(sigma) / 4.

@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Image channels.
        label_dim       = 0,                # Number of classes; 0 = unconditional.
        use_fp16        = False,            # Run the model in float16 on CUDA?
        sigma_min       = 0,                # Lowest noise level supported.
        sigma_max       = float('inf'),     # Highest noise level supported.
        sigma_data      = 0.5,              # Standard deviation of the training data.
        model_type      = 'DhariwalUNet',   # Class name of the model F.
        **model_kwargs,                     # Constructor arguments of F.
    ):
        super().__init__()
        _setup(self, model_type, img_channels, model_kwargs,
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
            sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)

    def coefficients(self, sigma):
        s2 = self.sigma_data ** 2
        c_skip = s2 / (sigma ** 2 + s2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + s2).sqrt()
        c_in = 1 / (s2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return precondition(self, self.coefficients, x, sigma, class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma):
        return _scalar(sigma)

#----------------------------------------------------------------------------

"""The noise-conditional ADM encoder used by discriminator guidance (Kim et al., ICML 2023).

Dhariwal & Nichol's classifier is the downsampling half of their U-Net (guided-diffusion's
`EncoderUNetModel`): residual blocks with scale-shift normalization from a timestep embedding,
self-attention at chosen resolutions, residual down-sampling blocks, a middle block, and an
attention-pooling head. Discriminator guidance uses it twice:

- the frozen feature extractor, ADM's CIFAR-10 / ImageNet-64 classifier (`32x32_classifier.pt`,
  width 128, 4 blocks per level, attention at 32/16/8 px), whose pre-pooling middle-block output
  ([N, 512, 8, 8] at 32 and 64 px) is the feature;
- the discriminator head, the same family run on those features (8x8, 512 in, width 128, 2 blocks,
  one output, optionally a class embedding), trained per generator (`discriminator_*.pt`).

Attribute names follow guided-diffusion, so the published state dicts load with strict=True:
`time_embed.{0,2}`, `label_emb`, `input_blocks.K.M...`, `middle_block.{0,1,2}`, `out.{0,2}`.
Time is VP time t in [0, 1]; the network sees 999 t, as the DG code feeds it.
"""

import math

import torch

#----------------------------------------------------------------------------

def group_norm(channels):
    """ADM's GroupNorm32 (32 groups; float16 is normalized in float32); fewer groups where 32 do not divide the channels."""
    return GroupNorm32(math.gcd(32, channels), channels)

class GroupNorm32(torch.nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).to(x.dtype) if x.dtype == torch.float16 else super().forward(x)

def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding [N, dim] of (fractional) timesteps [N]: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb

#----------------------------------------------------------------------------

class ResBlock(torch.nn.Module):
    """Residual block with scale-shift conditioning on the embedding; `down` halves the resolution."""
    def __init__(self,
        channels,                       # Input channels.
        emb_channels,                   # Embedding channels.
        out_channels    = None,         # Output channels; None = channels.
        down            = False,        # Average-pool by 2 inside the block (ADM's resblock_updown)?
        dropout         = 0,            # Dropout before the last convolution.
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.down = down
        self.in_layers = torch.nn.Sequential(group_norm(channels), torch.nn.SiLU(), torch.nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = torch.nn.Sequential(group_norm(out_channels), torch.nn.SiLU(), torch.nn.Dropout(p=dropout),
            torch.nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = torch.nn.Identity() if out_channels == channels else torch.nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        if self.down: # Both paths are pooled, the main one between activation and convolution.
            h = torch.nn.functional.avg_pool2d(h, 2)
            x = torch.nn.functional.avg_pool2d(x, 2)
        h = self.in_layers[2](h)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h

def num_heads(channels, head_channels):
    """ADM's heads of head_channels each; layers narrower than one head (test networks) get one."""
    assert channels % head_channels == 0 or channels < head_channels, f'{channels} channels do not split into heads of {head_channels}'
    return max(1, channels // head_channels)

def qkv_attention(q, k, v):
    """Softmax attention over the last axis: q, k, v [B, C, T] -> [B, C, T]."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1])) # Split between q and k, as ADM does for float16.
    w = torch.einsum('bct,bcs->bts', q * scale, k * scale)
    w = torch.softmax(w.float() if w.dtype == torch.float16 else w, dim=-1).to(w.dtype) # float16: softmax in float32, as ADM.
    return torch.einsum('bts,bcs->bct', w, v)

class AttentionBlock(torch.nn.Module):
    """Self-attention over pixels, qkv split per head (ADM's legacy order)."""
    def __init__(self, channels, head_channels=64):
        super().__init__()
        self.num_heads = num_heads(channels, head_channels)
        self.norm = group_norm(channels)
        self.qkv = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3 * c // self.num_heads, h * w)
        q, k, v = qkv.chunk(3, dim=1)
        out = self.proj_out(qkv_attention(q, k, v).reshape(b, c, h * w))
        return (x + out).reshape(b, c, h, w)

class AttentionPool2d(torch.nn.Module):
    """CLIP-style pooling: the mean pixel, as an extra token, attends to all pixels; qkv split before heads."""
    def __init__(self, resolution, channels, head_channels, out_channels):
        super().__init__()
        self.num_heads = num_heads(channels, head_channels)
        self.positional_embedding = torch.nn.Parameter(torch.randn(channels, resolution ** 2 + 1) / channels ** 0.5)
        self.qkv_proj = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = torch.nn.Conv1d(channels, out_channels, 1)

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        q, k, v = self.qkv_proj(x).chunk(3, dim=1)
        heads = lambda y: y.reshape(b * self.num_heads, c // self.num_heads, -1)
        out = qkv_attention(heads(q), heads(k), heads(v)).reshape(b, c, -1)
        return self.c_proj(out)[:, :, 0]

class EmbedSequential(torch.nn.Sequential):
    """A block of layers; residual blocks also get the embedding."""
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x

#----------------------------------------------------------------------------

class EncoderUNet(torch.nn.Module):
    """ADM's encoder: x [N, C, R, R] and VP time t [N] -> logits [N, out_channels], or features."""
    def __init__(self,
        img_resolution,                 # Input resolution R.
        in_channels,                    # Input channels (3 for images, 512 for the discriminator on features).
        out_channels,                   # Outputs of the attention-pooling head.
        model_channels      = 128,      # Base width ("classifier_width").
        channel_mult        = (1, 2, 4),# Width multiplier per resolution level.
        num_res_blocks      = 4,        # Residual blocks per level ("classifier_depth").
        attn_resolutions    = (32, 16, 8), # Resolutions (in pixels) with self-attention.
        head_channels       = 64,       # Channels per attention head.
        num_classes         = 0,        # Class-embedding rows; 0 = unconditional. DG's discriminators have 1000.
        dropout             = 0,        # Dropout inside the residual blocks.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        emb_channels = model_channels * 4
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(model_channels, emb_channels), torch.nn.SiLU(), torch.nn.Linear(emb_channels, emb_channels))
        if num_classes:
            self.label_emb = torch.nn.Embedding(num_classes, emb_channels)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = torch.nn.ModuleList([EmbedSequential(torch.nn.Conv2d(in_channels, ch, 3, padding=1))])
        res = img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_channels, int(mult * model_channels), dropout=dropout)]
                ch = int(mult * model_channels)
                if res in attn_resolutions:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(EmbedSequential(*layers))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(ResBlock(ch, emb_channels, down=True, dropout=dropout)))
                res //= 2
        self.middle_block = EmbedSequential(ResBlock(ch, emb_channels, dropout=dropout), AttentionBlock(ch, head_channels),
            ResBlock(ch, emb_channels, dropout=dropout))
        self.out = torch.nn.Sequential(group_norm(ch), torch.nn.SiLU(), AttentionPool2d(res, ch, head_channels, out_channels))
        self.feature_channels = ch
        self.feature_resolution = res

    def embedding(self, t, class_labels=None):
        emb = self.time_embed(timestep_embedding(t * 999, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes:
            if class_labels is None:
                raise ValueError('this network is class-conditional; pass class labels')
            index = class_labels if class_labels.ndim == 1 else class_labels.argmax(dim=1)
            emb = emb + self.label_emb(index.to(torch.int64))
        return emb

    def features(self, x, t, class_labels=None):
        """The middle block's output [N, feature_channels, feature_resolution, feature_resolution]."""
        emb = self.embedding(t, class_labels)
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return self.middle_block(h, emb)

    def forward(self, x, t, class_labels=None):
        """Logits [N, out_channels] (the discriminator's: pre-sigmoid)."""
        return self.out(self.features(x, t, class_labels))

#----------------------------------------------------------------------------
# The two published configurations (guided-diffusion's create_classifier with
# the arguments the DG code passes), parameterized so that tests can shrink them.

ADM_CHANNEL_MULT = {8: (1,), 16: (1, 2), 32: (1, 2, 4), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}

def classifier_kwargs(img_resolution=32, model_channels=128, num_res_blocks=None, head_channels=64, num_outputs=1000, in_channels=3, channel_mult=None):
    """The feature extractor, `32x32_classifier.pt`'s layout at 32 px: depth 4 at 32/64 px, else 2."""
    if channel_mult is None:
        if img_resolution not in ADM_CHANNEL_MULT:
            raise ValueError(f'no ADM classifier layout for {img_resolution}x{img_resolution} images (have: {sorted(ADM_CHANNEL_MULT)})')
        channel_mult = ADM_CHANNEL_MULT[img_resolution]
    if num_res_blocks is None:
        num_res_blocks = 4 if img_resolution in (32, 64) else 2
    return dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=num_outputs, model_channels=model_channels,
        channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks, attn_resolutions=(32, 16, 8), head_channels=head_channels,
        num_classes=0)

def discriminator_kwargs(feature_channels=512, feature_resolution=8, cond=False, model_channels=128, num_res_blocks=2, head_channels=64, num_classes=1000):
    """The discriminator head of `discriminator_*.pt`: one output; 1000 class rows when conditional, as DG's."""
    return dict(img_resolution=feature_resolution, in_channels=feature_channels, out_channels=1, model_channels=model_channels,
        channel_mult=(1,), num_res_blocks=num_res_blocks, attn_resolutions=(feature_resolution,), head_channels=head_channels,
        num_classes=num_classes if cond else 0)

#----------------------------------------------------------------------------
# Layouts read back from a state dict, so that checkpoints of any width or
# depth (e.g. a classifier trained here for a new dataset) load without flags.

def describe_mismatch(module, state_dict, limit=6):
    """One line naming the missing, unexpected and wrongly-shaped keys of state_dict for module; '' if none."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    listing = lambda keys: ', '.join(keys[:limit]) + (f' (+{len(keys) - limit} more)' if len(keys) > limit else '')
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f'{k} is {list(given[k])}, expected {list(expected[k])}' for k in expected if k in given and given[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f'missing keys: {listing(missing)}')
    if unexpected:
        parts.append(f'unexpected keys: {listing(unexpected)}')
    if shapes:
        parts.append(f'wrong shapes: {listing(shapes)}')
    return '; '.join(parts)

def infer_kwargs(state_dict, img_resolution):
    """EncoderUNet constructor arguments of a state dict for inputs of img_resolution; ValueError if it is not one."""
    for key in ['time_embed.0.weight', 'input_blocks.0.0.weight', 'out.2.positional_embedding', 'out.2.c_proj.weight']:
        if key not in state_dict:
            raise ValueError(f'not an ADM encoder state dict (no "{key}")')
    model_channels = state_dict['time_embed.0.weight'].shape[1]
    feature_resolution = int(round((state_dict['out.2.positional_embedding'].shape[1] - 1) ** 0.5))
    num_levels = 1
    while img_resolution >> (num_levels - 1) > feature_resolution:
        num_levels += 1
    if img_resolution >> (num_levels - 1) != feature_resolution:
        raise ValueError(f'its pooling head is for {feature_resolution}x{feature_resolution} features, which {img_resolution}x{img_resolution} inputs do not reduce to')
    num_blocks = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('input_blocks.'))
    num_res_blocks, rest = divmod(num_blocks - 1 - (num_levels - 1), num_levels)
    if rest or num_res_blocks < 1:
        raise ValueError(f'its {num_blocks} input blocks do not make {num_levels} levels for {img_resolution}x{img_resolution} inputs; is it for another image size?')
    channel_mult, attn_resolutions = [], []
    for level in range(num_levels):
        first = 1 + level * (num_res_blocks + 1) # The level's first residual block.
        channel_mult.append(state_dict[f'input_blocks.{first}.0.in_layers.2.weight'].shape[0] / model_channels)
        if f'input_blocks.{first}.1.qkv.weight' in state_dict:
            attn_resolutions.append(img_resolution >> level)
    return dict(img_resolution=img_resolution, in_channels=state_dict['input_blocks.0.0.weight'].shape[1],
        out_channels=state_dict['out.2.c_proj.weight'].shape[0], model_channels=model_channels,
        channel_mult=tuple(int(m) if float(m).is_integer() else m for m in channel_mult), num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(attn_resolutions), num_classes=state_dict['label_emb.weight'].shape[0] if 'label_emb.weight' in state_dict else 0)

#----------------------------------------------------------------------------

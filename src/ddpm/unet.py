"""The noise-prediction U-Net of Ho et al. (2020), Appendix B.

A PixelCNN++-style U-Net (the reference is ``diffusion_tf/models/unet.py`` of
hojonathanho/diffusion): wide ResNet blocks with GroupNorm and SiLU, the sinusoidal timestep
embedding of the Transformer passed through a two-layer MLP and added inside every block,
single-head self-attention at chosen resolutions, dropout, channel multipliers per level,
skip connections from every block of the down path to the up path, and conv resampling.

It knows nothing of diffusion: ``UNet(config)(x, t)`` maps images ``x`` of shape (B, C, H, W)
and timesteps ``t`` of shape (B,) to a tensor of shape (B, out_channels, H, W).

Numerics follow the TF reference (and diffusers' UNet2DModel in the google/ddpm-cifar10-32
layout, which ``UNet.from_diffusers`` converts exactly): GroupNorm eps 1e-6; the downsampling
conv pads only right and bottom before a stride-2 "valid" 3x3 conv; the timestep embedding is
[sin, cos] with frequencies exp(-log(10000) * i / (half - 1)) (diffusers' flip_sin_to_cos=False,
freq_shift=1; other conventions are config fields).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


def image_hw(size) -> tuple[int, int]:
    """An ``image_size`` as (H, W): an int S is the square (S, S), a 2-sequence is (H, W) as given.

    Raises ValueError for anything else (a bool, a non-positive or non-integer value, a wrong length).
    """
    pair = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pair):
        raise ValueError(f"image_size must be a positive integer or a pair (H, W) of them, got {size!r}")
    return int(pair[0]), int(pair[1])


def check_num_classes(num_classes, who: str) -> None:
    """Refuse a ``num_classes`` config value that is neither None nor a positive integer."""
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"{who}.num_classes must be None (unconditional) or a positive integer, got {num_classes!r}")


@dataclass
class UNetConfig:
    """Architecture of a :class:`UNet` (saved in checkpoints; lists are turned into tuples).

    ``attn_resolutions`` are feature-map sizes (e.g. 16 means the 16x16 level of a 32x32 model).
    ``out_channels`` defaults to ``in_channels``. ``learn_sigma`` makes the network also output
    its reverse variances (Nichol & Dhariwal 2021): out_channels is then 2 * in_channels, the
    prediction and the interpolation v of eq. 15 (``diffusion.variance="learned_range"``); an
    ``out_channels`` equal to ``in_channels`` (a preset's) is doubled, and a network configured
    with 2 * in_channels outputs (a converted diffusers learned_range model) has learn_sigma set.
    ``norm_groups`` is the GroupNorm group count (32 in the paper); every channel count of the
    network must be divisible by it, so small models use fewer groups.
    ``flip_sin_to_cos`` and ``freq_shift`` pick the timestep embedding's convention (diffusers'
    UNet2DModel options of those names); the defaults are the DDPM reference's.
    ``num_classes`` makes the network class-conditional (labels 0..num_classes-1, and
    num_classes itself the null label of classifier-free guidance); None is unconditional.
    """

    in_channels: int = 3
    out_channels: int | None = None
    image_size: int | tuple[int, int] = 32  # S (square) or (H, W)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    resamp_with_conv: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attn: bool = True
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    num_classes: int | None = None
    learn_sigma: bool = False

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"UNetConfig.learn_sigma must be true or false, got {self.learn_sigma!r}")
        if self.learn_sigma and self.out_channels not in (None, self.in_channels, 2 * self.in_channels):
            raise ValueError(f"UNetConfig.learn_sigma needs out_channels = 2 * in_channels = {2 * self.in_channels} "
                             f"(prediction and variance channels), got {self.out_channels}")
        if self.out_channels is None or (self.learn_sigma and self.out_channels == self.in_channels):
            self.out_channels = self.in_channels * (2 if self.learn_sigma else 1)
        # One truth: a network with 2C outputs learns its variances, however it was configured.
        self.learn_sigma = self.out_channels == 2 * self.in_channels
        if isinstance(self.image_size, (tuple, list)):
            self.image_size = tuple(self.image_size)  # kept as given (JSON gives a list back)
        try:
            image_hw(self.image_size)
        except ValueError:
            raise ValueError(f"UNetConfig.image_size must be a positive integer or a pair (H, W) of them, "
                             f"got {self.image_size!r}") from None
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "num_heads", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"UNetConfig.ch_mult must be a non-empty tuple of positive integers, got {self.ch_mult}")
        if self.ch % 2 or self.ch < 4:
            raise ValueError(f"UNetConfig.ch must be even and >= 4 (sinusoidal embedding of size ch), got {self.ch}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if any(side % factor for side in self.hw):
            raise ValueError(
                f"UNetConfig.image_size={self.image_size} must be divisible by 2**(len(ch_mult)-1)={factor} "
                f"(ch_mult={self.ch_mult} downsamples {len(self.ch_mult) - 1} times)"
            )
        resolutions = self.resolutions
        for r in self.attn_resolutions:
            if r not in resolutions:
                raise ValueError(
                    f"UNetConfig.attn_resolutions contains {r}, which is not a resolution of this network; "
                    f"allowed: {resolutions}"
                )
        for c in sorted({self.ch * m for m in self.ch_mult} | {self.ch}):
            if c % self.norm_groups:
                raise ValueError(
                    f"UNetConfig: {c} channels are not divisible by norm_groups={self.norm_groups}; "
                    f"pick norm_groups dividing ch={self.ch} times every ch_mult"
                )
            attn_here = self.attn_resolutions or self.mid_attn
            if attn_here and c % self.num_heads:
                raise ValueError(f"UNetConfig: {c} channels are not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"UNetConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not self.ch // 2 - self.freq_shift > 0:
            raise ValueError(f"UNetConfig.freq_shift must be < ch / 2 = {self.ch // 2}, got {self.freq_shift}")
        check_num_classes(self.num_classes, "UNetConfig")

    @property
    def hw(self) -> tuple[int, int]:
        """The input's (H, W): (S, S) for an int ``image_size``."""
        return image_hw(self.image_size)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level, from the input down; for a non-square (H, W) input the
        shorter side, which is what ``attn_resolutions`` entries are matched against."""
        return tuple(min(self.hw) // 2**i for i in range(len(self.ch_mult)))


# The networks of the run presets of the same name (``ddpm.presets``), and the paper's 256x256 one.
PRESETS: dict[str, UNetConfig] = {
    # The paper's CIFAR-10 model: 35.7M parameters, dropout 0.1.
    "cifar10": UNetConfig(3, 3, 32, 128, (1, 2, 2, 2), 2, (16,), 0.1),
    # The paper's CelebA-HQ / LSUN 256x256 model: about 114M parameters (dropout 0 there).
    "celebahq256": UNetConfig(3, 3, 256, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0),
    # MNIST on a CPU in minutes (0.64M parameters): thin at full resolution and wide below it
    # (28 -> 14 -> 7), which buys more steps per minute (docs/mnist-recipe.md); attention only in
    # the middle. No dropout: a short run underfits rather than overfits.
    "mnist": UNetConfig(1, 1, 28, 16, (1, 2, 4), 1, (), 0.0, norm_groups=8, mid_attn=True),
    # The same network with learned variances: only its output convolution doubles (2 channels).
    "mnist-learned": UNetConfig(1, 2, 28, 16, (1, 2, 4), 1, (), 0.0, norm_groups=8, mid_attn=True, learn_sigma=True),
    # For tests and smoke runs on MNIST-sized images: one block per level, no attention; a
    # forward pass takes milliseconds.
    "tiny": UNetConfig(1, 1, 28, 8, (1, 2), 1, (), 0.0, norm_groups=4, mid_attn=False),
}


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded (sampling); under autograd an in-place SiLU would
    # make autograd save a copy of its input anyway, so it gains nothing there.
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def timestep_frequencies(dim: int, freq_shift: float = 1.0) -> torch.Tensor:
    """The ``dim // 2`` frequencies of get_timestep_embedding: exp(-log(10000) * i / (half - freq_shift)).

    ``freq_shift`` is diffusers' ``freq_shift`` (``downscale_freq_shift``): 1 in the DDPM
    reference (the last frequency is exactly 1/10000), 0 in diffusers' UNet2DModel default."""
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - freq_shift)))


def batch_timesteps(t, x: torch.Tensor, who: str) -> torch.Tensor:
    """``t`` as a tensor of shape (B,) for the batch ``x``: a Python number or 0-d tensor is
    broadcast; any other shape is refused naming the network ``who``."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{who} expects t of shape (B,) = ({x.shape[0]},) or a scalar, got {tuple(t.shape)}")
    return t


def batch_labels(labels, batch: int, num_classes: int | None, device, who: str) -> torch.Tensor:
    """Class labels as a long tensor (B,) on ``device`` for a model with ``num_classes`` classes.

    None means the null label ``num_classes`` (unconditional) for every sample, and a Python int or
    0-d tensor is broadcast. A label must lie in 0..num_classes (num_classes is the null label);
    the range is checked only on the CPU, where it costs no device synchronisation.
    """
    if num_classes is None:
        raise ValueError(f"{who} is unconditional (num_classes=None) and takes no class labels")
    if labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if isinstance(labels, bool) or not isinstance(labels, (int, torch.Tensor)):
        raise ValueError(f"{who} expects labels as an int or an integer tensor of shape (B,), got {type(labels).__name__}")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{who} expects integer class labels (torch.long), got dtype {labels.dtype}")
    if labels.dim() == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise ValueError(f"{who} expects labels of shape (B,) = ({batch},) or a scalar, got {tuple(labels.shape)}")
    if labels.device.type == "cpu" and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(f"class label {lo if lo < 0 else hi} out of range; labels must lie in 0..{num_classes - 1} "
                             f"(or {num_classes}, the null label)")
    return labels.to(device=device, dtype=torch.long)


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor, flip_sin_to_cos: bool = False) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, 2 * len(freqs)) as [sin(t f), cos(t f)], in float32
    ([cos, sin] with ``flip_sin_to_cos``, diffusers' option of that name)."""
    args = t.to(torch.float32)[:, None] * freqs.to(torch.float32)[None, :]
    pair = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    return torch.cat(pair, dim=1)


class ResBlock(nn.Module):
    """Wide ResNet block: GN, SiLU, conv, + dense(SiLU(temb)), GN, SiLU, dropout, conv; 1x1 skip."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        # Timestep conditioning: a per-channel bias. In place is safe: conv backward does not
        # need its output.
        h.add_(self.temb_proj(temb_act)[:, :, None, None])
        h = _silu(self.norm2(h))
        if self.dropout > 0 and self.training:
            h = F.dropout(h, self.dropout, training=True)
        h = self.conv2(h)
        return h.add_(x if self.skip is None else self.skip(x))


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions (one head in the paper), with a residual."""

    def __init__(self, channels: int, num_heads: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # fused q, k, v projections (1x1 convs)
        self.proj_out = nn.Linear(channels, channels)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        nh = self.num_heads
        # (B, C, H, W) -> (B, HW, C): free for channels_last input, one copy otherwise.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        q, k, v = self.qkv(h).view(B, H * W, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C / nh)) v
        a = self.proj_out(a.transpose(1, 2).reshape(B, H * W, C))
        # x first: the sum takes x's memory format.
        return x + a.view(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a stride-2 3x3 conv (as the TF reference)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Level(nn.Module):
    """One resolution of the down or up path: res blocks, optional attention after each, resampler."""

    def __init__(self, res: list[ResBlock], attn: list[AttnBlock], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class UNet(nn.Module):
    """The paper's U-Net. ``forward(x (B, C, H, W), t (B,), labels (B,) = None) -> (B, out_channels, H, W)``;
    ``labels`` only for a class-conditional config (``num_classes``)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__}")
        self.config = c = config
        ch, temb_dim, g, eps = c.ch, 4 * c.ch, c.norm_groups, c.norm_eps

        def res(ci: int, co: int) -> ResBlock:
            return ResBlock(ci, co, temb_dim, c.dropout, g, eps)

        def attn(channels: int) -> AttnBlock:
            return AttnBlock(channels, c.num_heads, g, eps)

        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("time_freqs", timestep_frequencies(ch, c.freq_shift), persistent=False)
        self.temb_dense0 = nn.Linear(ch, temb_dim)
        self.temb_dense1 = nn.Linear(temb_dim, temb_dim)
        # Class conditioning as in improved-diffusion: a learned embedding per class, plus one for
        # the null label, added to the time embedding. Absent for an unconditional network, whose
        # parameters and state-dict keys are exactly those it always had.
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes + 1, temb_dim)
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        # Down path; remember the channels of every tensor pushed onto the skip stack.
        skip_ch, c_cur, n = [ch], ch, len(c.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            with_attn = c.resolutions[i] in c.attn_resolutions
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(res(c_cur, ch * mult))
                c_cur = ch * mult
                if with_attn:
                    attns.append(attn(c_cur))
                skip_ch.append(c_cur)
            down = Downsample(c_cur, c.resamp_with_conv) if i != n - 1 else None
            if down is not None:
                skip_ch.append(c_cur)
            self.down.append(Level(blocks, attns, down))

        self.mid_res1 = res(c_cur, c_cur)
        self.mid_attn = attn(c_cur) if c.mid_attn else None
        self.mid_res2 = res(c_cur, c_cur)

        # Up path, deepest level first; each block eats one skip tensor.
        self.up = nn.ModuleList()
        for i in reversed(range(n)):
            with_attn = c.resolutions[i] in c.attn_resolutions
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(res(c_cur + skip_ch.pop(), ch * c.ch_mult[i]))
                c_cur = ch * c.ch_mult[i]
                if with_attn:
                    attns.append(attn(c_cur))
            self.up.append(Level(blocks, attns, Upsample(c_cur, c.resamp_with_conv) if i != 0 else None))

        self.norm_out = nn.GroupNorm(g, c_cur, eps=eps)
        self.conv_out = nn.Conv2d(c_cur, c.out_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The TF reference's init: fan-avg uniform weights, zero biases, and zero for the last
        layer of each residual branch and of the network (each block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, AttnBlock)]
        for m in zero:
            nn.init.zeros_(m.weight)
        if self.num_classes is not None:
            nn.init.normal_(self.label_emb.weight)  # nn.Embedding's own init, as improved-diffusion

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a conditional network (its null label), None if unconditional."""
        return self.config.num_classes

    @classmethod
    def from_preset(cls, name: str, **overrides) -> UNet:
        """Build a preset (``cifar10``, ``celebahq256``, ``mnist``, ``tiny``) with field overrides;
        ``cifar10``, ``mnist`` and ``tiny`` are the networks of the run presets of those names.

        Overriding ``image_size`` alone keeps attention at the same levels (e.g. ``cifar10`` at
        64x64 attends at 32x32)."""
        return cls(preset_config(name, **overrides))

    @classmethod
    def from_diffusers(
        cls, model_or_state_dict, config: UNetConfig | None = None, *, image_size: int | None = None
    ) -> UNet:
        """Convert a diffusers ``UNet2DModel`` in the DDPM layout (google/ddpm-cifar10-32) or its
        state dict into a UNet computing the same function.

        Without ``config`` the architecture is read from the model's config, or inferred from the
        state dict's shapes (then ``image_size`` defaults to 32, dropout to 0, norm groups to 32).
        Options of diffusers that this network does not implement raise ValueError, and so do
        missing, unexpected or mis-shaped weights.
        """
        from .convert import convert_diffusers_state_dict, diffusers_state_and_config

        sd, inferred = diffusers_state_and_config(model_or_state_dict, image_size)
        model = cls(config if config is not None else inferred)
        model.load_state_dict(convert_diffusers_state_dict(sd, model.state_dict()))
        return model

    def _check_inputs(self, x: torch.Tensor, t) -> torch.Tensor:
        c = self.config
        h, w = c.hw
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[2] != h or x.shape[3] != w:
            raise ValueError(f"UNet expects x of shape (B, {c.in_channels}, {h}, {w}), got {tuple(x.shape)}")
        return batch_timesteps(t, x, "UNet")

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = self._check_inputs(x, t)
        freqs = self.time_freqs
        if freqs.dtype != torch.float32:  # the model was cast (e.g. .to(bfloat16)): recompute exactly
            freqs = timestep_frequencies(self.config.ch, self.config.freq_shift).to(x.device)
        # Timestep embedding, MLP, and the SiLU every block applies before its projection.
        emb = timestep_embedding(t, freqs, self.config.flip_sin_to_cos)
        temb = self.temb_dense0(emb.to(self.temb_dense0.weight.dtype))
        temb = self.temb_dense1(F.silu(temb))
        if self.num_classes is not None or labels is not None:
            # labels=None is the null label; batch_labels refuses labels for an unconditional network.
            labels = batch_labels(labels, x.shape[0], self.num_classes, x.device, "UNet")
            temb = temb + self.label_emb(labels)
        temb_act = F.silu(temb)

        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(h, temb_act)
                if len(level.attn):
                    h = level.attn[i](h)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)

        h = self.mid_res1(h, temb_act)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid_res2(h, temb_act)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = block(torch.cat([h, hs.pop()], dim=1), temb_act)
                if len(level.attn):
                    h = level.attn[i](h)
            if level.resample is not None:
                h = level.resample(h)

        h = self.conv_out(_silu(self.norm_out(h)))
        return h.to(x.dtype)


def attn_at_same_levels(config: UNetConfig, image_size) -> tuple[int, ...]:
    """``config.attn_resolutions`` moved to the same levels of the network for inputs of ``image_size``
    (S or (H, W)): ``cifar10`` attends at 16x16 of 32x32 inputs, at 32x32 of 64x64 ones."""
    levels = [int(math.log2(min(config.hw) // r)) for r in config.attn_resolutions]
    return tuple(min(image_hw(image_size)) // 2**lv for lv in levels)


def preset_config(name: str, **overrides) -> UNetConfig:
    """The :data:`PRESETS` entry ``name`` with fields replaced by ``overrides`` (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; allowed: {sorted(PRESETS)}")
    base = PRESETS[name]
    known = {f.name for f in fields(UNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown UNetConfig fields {unknown}; allowed: {sorted(known)}")
    if "image_size" in overrides and "attn_resolutions" not in overrides:
        overrides["attn_resolutions"] = attn_at_same_levels(base, overrides["image_size"])
    if "in_channels" in overrides and "out_channels" not in overrides:
        overrides["out_channels"] = None  # follow in_channels
    return replace(base, **overrides)

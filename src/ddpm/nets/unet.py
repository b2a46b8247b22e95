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

import torch
import torch.nn.functional as F
from torch import nn

from .convert import convert_diffusers_state_dict, diffusers_state_and_config
from .unet_config import UNetConfig, preset_config


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded (sampling); under autograd an in-place SiLU would
    # make autograd save a copy of its input anyway, so it gains nothing there.
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def timestep_frequencies(dim: int, freq_shift: float = 1.0) -> torch.Tensor:
    """The ``dim // 2`` frequencies of get_timestep_embedding: exp(-log(10000) * i / (half - freq_shift)).

    ``freq_shift`` is diffusers' ``freq_shift`` (``downscale_freq_shift``): 1 in the DDPM
    reference (the last frequency is exactly 1/10000), 0 in diffusers' UNet2DModel default."""
    half = dim // 2
    # Computed on the CPU and moved to the default device (the one a ``with torch.device(...)``
    # block sets): the same values wherever the network is built, and no ``arange`` on the meta
    # device, whose first call imports torch._dynamo (about 1 s of ``ddpm.load``'s shape check).
    i = torch.arange(half, dtype=torch.float32, device="cpu")
    return torch.exp(i * (-math.log(10000.0) / (half - freq_shift))).to(torch.get_default_device())


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

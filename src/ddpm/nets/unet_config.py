"""The architecture of a :class:`ddpm.nets.unet.UNet` as data: ``UNetConfig`` (validated at
construction, saved in every checkpoint) and the named network presets (``UNET_PRESETS``).

Plain dataclasses, no torch: a run's config (``ddpm.config``) and the data sources can describe
and check a network without building one. The network itself is ``ddpm.nets.unet``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..core.shapes import image_hw


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
UNET_PRESETS: dict[str, UNetConfig] = {
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


def attn_at_same_levels(config: UNetConfig, image_size) -> tuple[int, ...]:
    """``config.attn_resolutions`` moved to the same levels of the network for inputs of ``image_size``
    (S or (H, W)): ``cifar10`` attends at 16x16 of 32x32 inputs, at 32x32 of 64x64 ones."""
    levels = [int(math.log2(min(config.hw) // r)) for r in config.attn_resolutions]
    return tuple(min(image_hw(image_size)) // 2**lv for lv in levels)


def preset_config(name: str, **overrides) -> UNetConfig:
    """The :data:`UNET_PRESETS` entry ``name`` with fields replaced by ``overrides`` (validated)."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; allowed: {sorted(UNET_PRESETS)}")
    base = UNET_PRESETS[name]
    known = {f.name for f in fields(UNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown UNetConfig fields {unknown}; allowed: {sorted(known)}")
    if "image_size" in overrides and "attn_resolutions" not in overrides:
        overrides["attn_resolutions"] = attn_at_same_levels(base, overrides["image_size"])
    if "in_channels" in overrides and "out_channels" not in overrides:
        overrides["out_channels"] = None  # follow in_channels
    return replace(base, **overrides)

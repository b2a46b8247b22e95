"""A small noise-prediction network for 2-D (or any low-dimensional) data.

For the toy data sets (two moons, Gaussian mixtures, ...): ``MLPDenoiser(config)(x, t)`` maps
points ``x`` of shape (B, dim) and timesteps ``t`` of shape (B,) to (B, dim). The timestep
enters through the same sinusoidal embedding as the U-Net (Ho et al. 2020, Appendix B), passed
through a two-layer MLP and added to every residual block, so the network is a 1-D analogue of
the U-Net's conditioning without the convolutions. With ``num_classes`` it is class-conditional
the U-Net's way (a label embedding added to the time embedding; ``num_classes`` is the null label).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import batch_labels, batch_timesteps, timestep_embedding, timestep_frequencies
from .unet_config import check_num_classes


@dataclass
class MLPConfig:
    """Architecture of an :class:`MLPDenoiser` (saved in checkpoints)."""

    dim: int = 2
    hidden: int = 256
    depth: int = 4  # number of residual blocks
    time_embed_dim: int = 64
    dropout: float = 0.0
    num_classes: int | None = None  # class-conditional with labels 0..num_classes-1 (+ the null label)
    learn_sigma: bool = False  # also output the variance interpolation v (B, dim): (B, 2 dim) in all

    def __post_init__(self) -> None:
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"MLPConfig.learn_sigma must be true or false, got {self.learn_sigma!r}")
        for name in ("dim", "hidden", "depth", "time_embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MLPConfig.{name} must be a positive integer, got {value!r}")
        if self.time_embed_dim % 2 or self.time_embed_dim < 4:
            raise ValueError(f"MLPConfig.time_embed_dim must be even and >= 4, got {self.time_embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLPConfig.dropout must be in [0, 1), got {self.dropout}")
        check_num_classes(self.num_classes, "MLPConfig")


class _Block(nn.Module):
    """Pre-norm residual block: x + W2 SiLU(W1 LN(x) + temb)."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        r = F.silu(self.fc1(self.norm(h)) + self.temb_proj(temb_act))
        r = F.dropout(r, self.dropout, training=self.training)
        return h + self.fc2(r)


class MLPDenoiser(nn.Module):
    """``forward(x (B, dim), t (B,), labels (B,) = None) -> (B, dim)``: the eps (or x0, v) prediction
    for points; ``labels`` only for a class-conditional config (None there is the null label).
    With ``learn_sigma`` the output is (B, 2 dim): the prediction, then the variance values v."""

    def __init__(self, config: MLPConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else MLPConfig()
        if not isinstance(c, MLPConfig):
            raise TypeError(f"MLPDenoiser expects an MLPConfig, got {type(c).__name__}")
        self.register_buffer("time_freqs", timestep_frequencies(c.time_embed_dim), persistent=False)
        self.temb_dense0 = nn.Linear(c.time_embed_dim, c.hidden)
        self.temb_dense1 = nn.Linear(c.hidden, c.hidden)
        if c.num_classes is not None:  # no new parameters for an unconditional network
            self.label_emb = nn.Embedding(c.num_classes + 1, c.hidden)
        self.fc_in = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(_Block(c.hidden, c.dropout) for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(c.hidden)
        self.fc_out = nn.Linear(c.hidden, c.dim * (2 if c.learn_sigma else 1))
        # Each residual branch starts at zero, so the network starts as a small smooth map.
        for block in self.blocks:
            nn.init.zeros_(block.fc2.weight)
            nn.init.zeros_(block.fc2.bias)

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a conditional network (its null label), None if unconditional."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        dim = self.config.dim
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"MLPDenoiser expects x of shape (B, {dim}), got {tuple(x.shape)}")
        t = batch_timesteps(t, x, "MLPDenoiser")
        freqs = self.time_freqs
        if freqs.dtype != torch.float32:  # the model was cast: recompute the frequencies exactly
            freqs = timestep_frequencies(self.config.time_embed_dim).to(x.device)
        emb = timestep_embedding(t, freqs).to(self.temb_dense0.weight.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(emb)))
        if self.num_classes is not None or labels is not None:
            # labels=None is the null label; batch_labels refuses labels for an unconditional network.
            labels = batch_labels(labels, x.shape[0], self.num_classes, x.device, "MLPDenoiser")
            temb = temb + self.label_emb(labels)
        temb_act = F.silu(temb)
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, temb_act)
        return self.fc_out(F.silu(self.norm_out(h))).to(x.dtype)

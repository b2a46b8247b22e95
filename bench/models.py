"""The model pair every benchmark compares: diffusers' UNet2DModel in the DDPM CIFAR-10 layout
(the layout of google/ddpm-cifar10-32) and our ``UNet`` holding identical weights, converted
with ``UNet.from_diffusers``. Both are exposed with the sampler signature ``model(x_t, t)``.
"""

from __future__ import annotations

import torch
from torch import nn

# diffusers' config for the paper's CIFAR-10 network (Ho et al. 2020, appendix B): ch=128,
# ch_mult (1, 2, 2, 2), two residual blocks per resolution, self-attention at 16x16.
DIFFUSERS_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu",
    attention_head_dim=None,
    norm_eps=1e-6,
    norm_num_groups=32,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    center_input_sample=False,
    time_embedding_type="positional",
    dropout=0.1,
)


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel behind the sampler signature ``model(x_t, t) -> eps``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def diffusers_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**DIFFUSERS_CIFAR10)


def model_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(ours, diffusers) with identical weights, both in train mode, float32, on the CPU."""
    from ddpm.nets.unet import UNet

    theirs = diffusers_unet(seed)
    return UNet.from_diffusers(theirs), DiffusersEps(theirs)

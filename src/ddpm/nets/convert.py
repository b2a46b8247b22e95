"""diffusers ``UNet2DModel`` in the DDPM layout (google/ddpm-cifar10-32) -> ``ddpm.UNet``.

Used by ``UNet.from_diffusers``: the two networks compute the same function; parameter names
differ and this U-Net fuses the attention's q, k, v projections into one matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet_config import UNetConfig

# ---------------------------------------------------------------------------------------------
# diffusers UNet2DModel (DDPM layout) -> UNet. Same computation; names differ and q, k, v are fused.

# diffusers option -> the only value this network reproduces.
_DIFFUSERS_REQUIRED = {
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "downsample_padding": 0, "resnet_time_scale_shift": "default", "act_fn": "silu",
    "center_input_sample": False, "mid_block_scale_factor": 1, "class_embed_type": None,
    "num_class_embeds": None, "downsample_type": "conv", "upsample_type": "conv",
}
_DIFFUSERS_RENAMES = [  # (diffusers fragment, ours), applied in order
    ("time_embedding.linear_1.", "temb_dense0."), ("time_embedding.linear_2.", "temb_dense1."),
    ("down_blocks.", "down."), ("up_blocks.", "up."), ("resnets.", "res."), ("attentions.", "attn."),
    ("downsamplers.0.", "resample."), ("upsamplers.0.", "resample."),
    ("mid_block.res.0.", "mid_res1."), ("mid_block.res.1.", "mid_res2."), ("mid_block.attn.0.", "mid_attn."),
    ("time_emb_proj.", "temb_proj."), ("conv_shortcut.", "skip."), ("group_norm.", "norm."),
    ("to_out.0.", "proj_out."), ("proj_attn.", "proj_out."), ("conv_norm_out.", "norm_out."),
]
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2, "query": 0, "key": 1, "value": 2}  # new and deprecated names


def diffusers_state_and_config(model_or_state_dict, image_size: int | None,
                               diffusers_config: dict | None = None) -> tuple[dict, UNetConfig]:
    """(state dict, UNetConfig) of a UNet2DModel, or of its state dict with (``diffusers_config``,
    every key filled in: ddpm.io.diffusers reads config.json) or without its config."""
    if isinstance(model_or_state_dict, nn.Module) or diffusers_config is not None:
        module = isinstance(model_or_state_dict, nn.Module)
        sd = model_or_state_dict.state_dict() if module else model_or_state_dict
        dc = dict(diffusers_config if diffusers_config is not None else model_or_state_dict.config)
        for key, want in _DIFFUSERS_REQUIRED.items():
            if key in dc and dc[key] != want and not (key == "mid_block_scale_factor" and float(dc[key]) == 1.0):
                raise ValueError(f"from_diffusers: {key}={dc[key]!r} is not the DDPM layout; only {want!r} works")
        heads = {1}
        if dc.get("attention_head_dim") is not None:  # diffusers: heads = channels // attention_head_dim
            boc, types = dc["block_out_channels"], dc["down_block_types"]
            attn_ch = [c for c, kind in zip(boc, types) if "Attn" in kind] + [boc[-1]]  # + the mid block
            heads = {c // dc["attention_head_dim"] for c in attn_ch}
        if len(heads) != 1 or dc.get("attn_norm_num_groups") is not None:
            raise ValueError("from_diffusers: attention_head_dim must give the same head count at every level, "
                             "and attn_norm_num_groups must be None")
        size = dc["sample_size"]
        image_size = image_size or int(size if isinstance(size, int) else size[0])
        extra = {"dropout": float(dc.get("dropout", 0.0)), "norm_groups": int(dc["norm_num_groups"]),
                 "norm_eps": float(dc["norm_eps"]), "num_heads": heads.pop(),
                 # Both sinusoidal conventions (diffusers' default and the DDPM reference's) are ours too.
                 "flip_sin_to_cos": bool(dc.get("flip_sin_to_cos", True)),
                 "freq_shift": float(dc.get("freq_shift", 0))}  # (diffusers' defaults)
    elif isinstance(model_or_state_dict, dict):
        sd, extra = model_or_state_dict, {"dropout": 0.0}
    else:
        kind = type(model_or_state_dict).__name__
        raise TypeError(f"from_diffusers expects a diffusers UNet2DModel or its state dict, got {kind}")
    try:  # the architecture, read from the weights' shapes
        ch, in_channels = sd["conv_in.weight"].shape[:2]
        n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
        boc = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)]
        blocks = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets."))
        out_channels = sd["conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"from_diffusers: not a UNet2DModel state dict in the DDPM layout (missing {e})") from None
    if any(c % ch for c in boc):
        raise ValueError(f"from_diffusers: block_out_channels {boc} are not multiples of the first ({ch})")
    image_size = image_size or 32
    attn = tuple(image_size // 2**i for i in range(n) if any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd))
    config = UNetConfig(
        int(in_channels), int(out_channels), image_size, int(ch), tuple(c // ch for c in boc), blocks, attn,
        mid_attn=any(k.startswith("mid_block.attentions.") for k in sd), **extra,
    )
    return sd, config


def convert_diffusers_state_dict(sd: dict, ours: dict) -> dict:
    out, qkv = {}, {}
    for key, value in sd.items():
        new = key
        for a, b in _DIFFUSERS_RENAMES:
            new = new.replace(a, b)
        parts = new.split(".")
        if len(parts) >= 2 and parts[-2] in _QKV:  # ....attn.j.to_q.weight -> ....attn.j.qkv.weight
            qkv.setdefault(".".join(parts[:-2] + ["qkv", parts[-1]]), [None] * 3)[_QKV[parts[-2]]] = value
            continue
        if new not in ours:
            raise ValueError(f"from_diffusers: unexpected weight {key!r} (not part of the DDPM layout)")
        out[new] = value
    for new, (q, k, v) in qkv.items():
        if q is None or k is None or v is None:
            raise ValueError(f"from_diffusers: incomplete q/k/v projections for {new!r}")
        # Deprecated checkpoints store these as 1x1 convs; a linear layer needs (out, in).
        out[new] = torch.cat([w.reshape(w.shape[0], -1) if w.dim() > 2 else w for w in (q, k, v)], dim=0)
    for new, value in list(out.items()):
        if new not in ours:
            raise ValueError(f"from_diffusers: unexpected weight {new!r} (not part of the DDPM layout)")
        if new.endswith("proj_out.weight") and value.dim() > 2:
            out[new] = value = value.reshape(value.shape[0], -1)
        if tuple(value.shape) != tuple(ours[new].shape):
            shape, want = tuple(value.shape), tuple(ours[new].shape)
            raise ValueError(f"from_diffusers: {new!r} has shape {shape}, expected {want}")
    missing = sorted(set(ours) - set(out))
    if missing:
        raise ValueError(f"from_diffusers: missing weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out

"""The paper's U-Net: parameter counts, shapes and errors, exact parity with diffusers'
UNet2DModel in the DDPM layout (skipped without diffusers, a test-only peer), and agreement of the
fast paths (channels_last, bf16)."""

import json
import math
import re
from dataclasses import replace

import pytest
import torch

from ddpm.nets.unet import UNet, UNetConfig, timestep_embedding, timestep_frequencies
from ddpm.nets.unet_config import UNET_PRESETS, preset_config

# A 3-channel 16x16 network with attention at 8x8 and in the middle, every part of the
# architecture at a size where a forward pass takes milliseconds. Spelled out rather than taken
# from the "tiny" preset, which follows the run preset of that name.
SMALL = UNetConfig(in_channels=3, image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   dropout=0.0, norm_groups=8)


def small_unet(**overrides) -> UNet:
    return UNet(replace(SMALL, **overrides))


def ddpm_cifar10_diffusers(block_out_channels=(128, 256, 256, 256), norm_num_groups=32, attention_head_dim=None):
    """A randomly initialised diffusers UNet2DModel with google/ddpm-cifar10-32's config."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=attention_head_dim, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        norm_eps=1e-6, norm_num_groups=norm_num_groups, act_fn="silu", center_input_sample=False,
        mid_block_scale_factor=1, time_embedding_type="positional",
    ).eval()


def n_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet.from_preset(name).parameters())


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: the paper's init zeroes the last layers, hiding bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(1, p[0].numel()))) if p.dim() > 1
                    else 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_parameter_counts_match_the_paper():
    assert abs(n_params("cifar10") / 35.7e6 - 1) < 0.005
    assert abs(n_params("celebahq256") / 114e6 - 1) < 0.02
    assert n_params("mnist") < n_params("cifar10") / 10


def test_timestep_embedding_matches_the_tf_reference():
    # get_timestep_embedding of diffusion_tf/nn.py, written out: [sin(t f_i), cos(t f_i)],
    # f_i = exp(-log(10000) * i / (half - 1)).
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, timestep_frequencies(8))
    half = 4
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            f = math.exp(-math.log(10000) * i / (half - 1))
            assert emb[b, i].item() == pytest.approx(math.sin(tb * f), abs=1e-5)
            assert emb[b, half + i].item() == pytest.approx(math.cos(tb * f), abs=1e-5)


@pytest.mark.parametrize("name", ["tiny", "mnist"])
def test_presets_predict_per_sample_and_per_timestep(name):
    # The paper's init zeroes the output layer: eps_theta starts at exactly 0.
    fresh = UNet.from_preset(name).eval()
    c = fresh.config
    x = torch.randn(3, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 999, 999])
    with torch.no_grad():
        out = fresh(x, t)
    assert out.shape == (3, c.out_channels, c.image_size, c.image_size) and out.dtype == x.dtype
    assert torch.count_nonzero(out) == 0
    # With weights everywhere: each sample's output depends on its own x_t and t alone (GroupNorm,
    # no batch statistics), and on t.
    model = randomized(UNet.from_preset(name))
    with torch.no_grad():
        out = model(x, t)
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(3)])
        other_t = model(x[1:2], torch.tensor([500]))
    assert torch.allclose(out, alone, atol=1e-5, rtol=1e-4)
    assert (other_t - out[1:2]).abs().max() > 1e-3 * out[1:2].abs().max()


@pytest.mark.parametrize(
    "overrides",
    [{"resamp_with_conv": False}, {"mid_attn": False, "attn_resolutions": ()}, {"num_heads": 2, "out_channels": 6}],
)
def test_architecture_options(overrides):
    model = small_unet(**overrides).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 9])).shape == (2, model.config.out_channels, 16, 16)
    if not model.config.resamp_with_conv:
        assert model.down[0].resample.conv is None and model.up[0].resample.conv is None


def test_output_depends_on_t_and_accepts_int_float_and_scalar_t():
    model = randomized(small_unet(in_channels=1, out_channels=1, image_size=28, attn_resolutions=(14,)))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        a = model(x, torch.tensor([5, 5]))
        assert torch.equal(a, model(x, torch.tensor([5.0, 5.0])))
        assert torch.equal(a, model(x, torch.tensor(5)))
        assert torch.equal(a, model(x, 5))
        assert (a - model(x, torch.tensor([6, 6]))).abs().max() > 1e-4
        # Batch items are independent (GroupNorm is per sample).
        assert torch.allclose(model(x[:1], torch.tensor([5])), a[:1], atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = small_unet()
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.randn(3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"t of shape"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"image_size": 17}, "divisible by 2"),
        ({"attn_resolutions": (5,)}, "allowed: \\(32, 16, 8, 4\\)"),
        ({"norm_groups": 12}, "norm_groups=12"),
        ({"ch": 31}, "even"),
        ({"dropout": 1.0}, "dropout"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"num_heads": 3}, "num_heads=3"),
        ({"bogus": 1}, "unknown UNetConfig fields"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        preset_config("cifar10", **overrides)


def test_presets_and_config_round_trip():
    with pytest.raises(ValueError, match=re.escape(f"unknown UNet preset 'imagenet'; allowed: {sorted(UNET_PRESETS)}")):
        UNet.from_preset("imagenet")
    # JSON turns tuples into lists; the run config (which rebuilds model configs) takes them back.
    from ddpm.config import TrainConfig

    saved = json.loads(TrainConfig(model=UNET_PRESETS["cifar10"]).to_json())
    assert saved["model"]["ch_mult"] == [1, 2, 2, 2]
    assert TrainConfig.from_dict(saved).model == UNET_PRESETS["cifar10"]
    # A new image size keeps attention at the same level; a new in_channels carries out_channels.
    c = preset_config("cifar10", image_size=64, in_channels=1)
    assert c.attn_resolutions == (32,) and c.out_channels == 1


def test_from_diffusers_full_cifar10_layout_matches():
    peer = ddpm_cifar10_diffusers()
    ours = UNet.from_diffusers(peer).eval()
    assert ours.config.ch_mult == (1, 2, 2, 2) and ours.config.attn_resolutions == (16,)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 871])
    with torch.no_grad():
        expected = peer(x, t).sample
        got = ours(x, t)
    assert (got - expected).abs().max() < 1e-4


def test_from_diffusers_state_dict_small_and_deprecated_names():
    peer = randomized(ddpm_cifar10_diffusers((32, 64, 64, 64), norm_num_groups=8))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        expected = peer(x, t).sample
    config = preset_config("cifar10", ch=32, norm_groups=8)
    from_model = UNet.from_diffusers(peer).eval()
    assert from_model.config.norm_groups == 8
    # Multi-head attention (diffusers' attention_head_dim) converts too.
    peer4 = randomized(ddpm_cifar10_diffusers((32, 64, 64, 64), norm_num_groups=8, attention_head_dim=16))
    heads4 = UNet.from_diffusers(peer4).eval()
    assert heads4.config.num_heads == 4
    with torch.no_grad():
        expected4 = peer4(x, t).sample
        assert (heads4(x, t) - expected4).abs().max() < 1e-4 * expected4.abs().max()
    # A bare state dict carries no norm group count: pass the config.
    sd = peer.state_dict()
    from_sd = UNet.from_diffusers(sd, config).eval()
    # Old checkpoints (as published on the hub) name the attention weights query/key/value/proj_attn
    # and store them as 1x1 convs.
    old = {}
    for k, v in sd.items():
        for a, b in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".{a}." in k:
                k, v = k.replace(a, b), (v[:, :, None, None] if v.dim() == 2 else v)
        old[k] = v
    from_old = UNet.from_diffusers(old, config).eval()
    with torch.no_grad():
        for model in (from_model, from_sd, from_old):
            assert (model(x, t) - expected).abs().max() < 1e-4 * expected.abs().max()


def test_from_diffusers_refuses_bad_weights_and_layouts():
    peer = ddpm_cifar10_diffusers((32, 64, 64, 64), norm_num_groups=8)
    sd = dict(peer.state_dict())
    config = preset_config("cifar10", ch=32, norm_groups=8)
    missing = {k: v for k, v in sd.items() if not k.startswith("mid_block.resnets.1.")}
    with pytest.raises(ValueError, match="missing weights.*mid_res2"):
        UNet.from_diffusers(missing, config)
    with pytest.raises(ValueError, match="unexpected weight 'extra.weight'"):
        UNet.from_diffusers({**sd, "extra.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="has shape"):
        UNet.from_diffusers(sd, preset_config("cifar10", ch=32, norm_groups=8, ch_mult=(1, 2, 2, 4)))
    with pytest.raises(ValueError, match="not a UNet2DModel state dict"):
        UNet.from_diffusers({"weight": torch.zeros(1)})
    shifted = ddpm_cifar10_diffusers((32, 64, 64, 64), norm_num_groups=8)
    shifted.register_to_config(resnet_time_scale_shift="scale_shift")
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        UNet.from_diffusers(shifted)


@pytest.mark.parametrize("flip_sin_to_cos,freq_shift", [(True, 0), (False, 0), (True, 1), (False, 3)])
def test_from_diffusers_converts_both_sinusoidal_conventions(flip_sin_to_cos, freq_shift):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    peer = randomized(diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, norm_eps=1e-6, norm_num_groups=8,
        flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift))
    ours = UNet.from_diffusers(peer).eval()
    assert (ours.config.flip_sin_to_cos, ours.config.freq_shift) == (flip_sin_to_cos, freq_shift)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([7, 640])
    with torch.no_grad():
        expected = peer(x, t).sample
        assert (ours(x, t) - expected).abs().max() < 1e-4 * expected.abs().max()
        # The other convention gives a different function: the option is not a no-op.
        other = UNet(replace(ours.config, flip_sin_to_cos=not flip_sin_to_cos))
        other.load_state_dict(ours.state_dict())
        assert (other.eval()(x, t) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_frequencies_follow_the_default_device_with_the_same_values():
    # the values of the float32 formula on the CPU, wherever the network is built; on the meta device
    # (ddpm.load's shape check) only a shape, without the arange that imports torch._dynamo there
    half = 32
    expected = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1.0)))
    assert torch.equal(timestep_frequencies(2 * half), expected)
    with torch.device("meta"):
        freqs = timestep_frequencies(2 * half)
        net = UNet(SMALL)
    assert freqs.device.type == "meta" and freqs.shape == (half,)
    assert {b.device.type for b in net.buffers()} | {p.device.type for p in net.parameters()} == {"meta"}


def test_embedding_defaults_are_the_ddpm_reference_and_old_configs_load():
    # get_timestep_embedding of the TF reference: [sin, cos], frequencies 10000^(-i / (half - 1)).
    t = torch.tensor([0, 5, 999])
    half = 16
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / (half - 1))
    ref = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    got = timestep_embedding(t, timestep_frequencies(2 * half))
    assert (got.double() - ref).abs().max() < 1e-4
    assert torch.equal(timestep_frequencies(2 * half), timestep_frequencies(2 * half, 1.0))
    # A config saved before the embedding fields existed loads with the reference convention.
    from ddpm.config import TrainConfig

    d = TrainConfig(model=SMALL).to_dict()
    del d["model"]["flip_sin_to_cos"], d["model"]["freq_shift"]
    config = TrainConfig.from_dict(d).model
    assert (config.flip_sin_to_cos, config.freq_shift) == (False, 1.0)
    with pytest.raises(ValueError, match="freq_shift must be < ch / 2"):
        replace(SMALL, freq_shift=16.0)


def test_channels_last_and_bf16_autocast_agree_with_float32():
    model = randomized(small_unet())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref = model(x, t)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
        assert (cl - ref).abs().max() < 1e-4 * ref.abs().max()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(x, t)
        assert bf.dtype == torch.float32
        assert (bf - ref).abs().max() < 0.05 * ref.abs().max()
        # A model cast to bf16 still embeds t in float32 (no precision loss in the frequencies).
        half = model.to(torch.bfloat16)(x.bfloat16(), t)
        assert half.dtype == torch.bfloat16
        assert (half.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_dropout_and_one_training_step():
    model = small_unet(dropout=0.3)  # the paper's init
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([1, 10, 100, 500])
    target = 0.5 * x
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        before = (model(x, t) - target).pow(2).mean()
        assert torch.equal(model(x, t), model(x, t))  # no dropout in eval mode
    model.train()
    for _ in range(3):
        loss = (model(x, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    with torch.no_grad():
        assert not torch.equal(model(x, t), model(x, t))  # dropout is active in training
        model.eval()
        assert (model(x, t) - target).pow(2).mean() < 0.9 * before

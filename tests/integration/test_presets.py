"""Run presets (named recipes): each builds and validates, one name means one network, and the
config's choice lists are those of the modules that implement them."""

from __future__ import annotations

import json
import typing

import pytest
import torch

from ddpm.core import device as accel, diffusion, schedules
from ddpm.sampling import samplers
from ddpm.nets import unet_config as unet_module
from ddpm.config import DiffusionConfig, LoopConfig, SampleConfig, EvalConfig, TrainConfig, build_model
from ddpm.data.sources import SCHEMES, open_source
from ddpm.errors import UserError
from ddpm.presets import PRESETS, RECIPES, get_preset, resolve_config
from ddpm.nets.unet import UNet


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_validates_and_round_trips(name):
    config = get_preset(name)
    assert config.name == name
    assert get_preset(name) is not config and get_preset(name) == config  # a fresh copy each time
    # from_dict runs every section's validation again.
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config
    assert config.data.source.partition(":")[0] in SCHEMES
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model(config.model).parameters()) > 0


def test_presets_come_from_one_table_with_mnist_the_default():
    assert PRESETS == tuple(RECIPES) and PRESETS[0] == "mnist"
    assert resolve_config().name == "mnist"
    with pytest.raises(UserError, match="unknown preset 'imagenet'; choose one of mnist, cifar10, toy2d, tiny"):
        get_preset("imagenet")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "tiny"])
def test_network_preset_is_the_run_preset_network(name):
    with torch.device("meta"):
        model = UNet.from_preset(name)
    assert model.config == get_preset(name).model == unet_module.preset_config(name)


def test_network_only_presets_are_not_run_presets():
    assert set(unet_module.UNET_PRESETS) - set(PRESETS) == {"celebahq256"}


@pytest.mark.parametrize("name", ["mnist", "tiny"])
def test_mnist_networks_take_the_bundled_data(name):
    config = get_preset(name)
    x0 = open_source(config.data.source, split="test").get_batch([0, 1])
    c = UNet.from_preset(name).config
    assert x0.shape == (2, c.in_channels, c.image_size, c.image_size) == (2, 1, 28, 28)
    # uint8 pixels k mapped to k / 127.5 - 1: the [-1, 1] range, both ends reached (ink on black)
    assert x0.min() == -1 and x0.max() == 1
    assert torch.allclose((x0 + 1) * 127.5, ((x0 + 1) * 127.5).round(), atol=1e-4)


def _choices(cls, field: str) -> tuple:
    hint = typing.get_type_hints(cls)[field]
    assert typing.get_origin(hint) is typing.Literal
    return typing.get_args(hint)


def test_config_choices_are_those_of_the_implementing_modules():
    assert _choices(DiffusionConfig, "schedule") == schedules.SCHEDULES
    assert _choices(DiffusionConfig, "prediction") == diffusion.PREDICTIONS
    assert _choices(DiffusionConfig, "weighting") == diffusion.WEIGHTINGS
    assert _choices(DiffusionConfig, "variance") == diffusion.VARIANCES
    assert _choices(SampleConfig, "sampler") == _choices(EvalConfig, "sampler") == samplers.SAMPLERS
    assert _choices(LoopConfig, "amp") == ("auto", *accel.AMP_MODES)
    with pytest.raises(ValueError, match=r"sampler 'euler' not allowed; choose one of ddpm, ddim, dpm\+\+2m$"):
        SampleConfig(sampler="euler")
    with pytest.raises(ValueError, match="schedule 'quad' not allowed; choose one of linear, cosine, sqrt_linear, sqrt$"):
        DiffusionConfig(schedule="quad")


def test_a_presets_guidance_interval_follows_another_T_unless_the_user_set_one(tmp_path):
    # mnist guides for t in [600, 999] of T = 1000: with --timesteps 500 that would be refused (t > T - 1)
    # for a default the user never chose, so it covers the same share of the shorter chain instead.
    assert get_preset("mnist").sample.guidance_interval == (600, 999)
    assert resolve_config("mnist", **{"diffusion.timesteps": 500}).sample.guidance_interval == (300, 499)
    assert resolve_config("mnist-cond", **{"diffusion.timesteps": 100}).sample.guidance_interval == (30, 89)
    assert resolve_config("mnist", **{"diffusion.timesteps": 500, "sample.guidance_interval": (0, 99)}
                          ).sample.guidance_interval == (0, 99)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"diffusion": {"timesteps": 200}}))
    assert resolve_config("mnist", f).sample.guidance_interval == (120, 199)
    f.write_text(json.dumps({"diffusion": {"timesteps": 200}, "sample": {"guidance_interval": [10, 20]}}))
    assert resolve_config("mnist", f).sample.guidance_interval == (10, 20)
    assert resolve_config("mnist").sample.guidance_interval == (600, 999)  # the preset itself is untouched

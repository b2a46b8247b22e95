"""diffusers pipeline directories in (``ddpm.load``) and out (``ddpm export``), against diffusers
itself (a test-only peer): the same network function, the same betas, and for the same x_T the
same DDIM (eta 0) images from diffusers' scheduler and from ``ddpm.sample``.

Step grids: our ``spacing="leading"`` is diffusers' default "leading" with steps_offset 0 and
set_alpha_to_one (see test_sampler_parity.py); 10 steps divide T = 1000, so both visit the same
timesteps (asserted). Clipping: diffusers' DDIM recomputes eps from the clipped x0 only with
``use_clipped_model_output=True``, which ours always does. Tolerance: diffusers keeps abar in
float32, about 1e-5 of the sample scale after a few steps (test_sampler_parity.py); 2e-4 here.
"""

import inspect
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from test_unet import randomized  # noqa: E402

import ddpm  # noqa: E402
from ddpm.cli.main import main  # noqa: E402
from ddpm.io.checkpoint import save_checkpoint  # noqa: E402
from ddpm.config import DiffusionConfig, TrainConfig  # noqa: E402
from ddpm.io.diffusers import (SCHEDULER_DEFAULTS, UNET_DEFAULTS, diffusion_from_scheduler,  # noqa: E402
                               is_diffusers_dir)
from ddpm.io.run import export_diffusers  # noqa: E402
from ddpm.errors import UserError  # noqa: E402
from ddpm.sampling.samplers import timestep_grid  # noqa: E402
from ddpm.nets.unet import UNet, UNetConfig  # noqa: E402

STEPS = 10
SMALL = UNetConfig(in_channels=3, image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   dropout=0.0, norm_groups=8)


def unet2d(**overrides):
    """A small randomly initialised UNet2DModel in the DDPM layout (diffusers' embedding defaults)."""
    torch.manual_seed(0)
    kw = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=8, downsample_padding=0, norm_num_groups=8)
    return randomized(diffusers.UNet2DModel(**{**kw, **overrides}))


def x_T(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def diffusers_ddim(unet, scheduler_config: dict, x: torch.Tensor) -> torch.Tensor:
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(STEPS)
    assert torch.equal(scheduler.timesteps, timestep_grid(scheduler.config.num_train_timesteps, STEPS, "leading"))
    for t in scheduler.timesteps:
        out = unet(x, t).sample
        x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def ours_ddim(run, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ddpm.sample(run.model, run.schedule, tuple(x.shape), sampler="ddim", steps=STEPS, eta=0.0,
                           spacing="leading", x_T=x, **run.sample_kwargs)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 2e-4) -> None:
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < tol, f"differ by {err:.2e} of the sample scale"


def test_default_tables_are_the_installed_diffusers_signatures():
    for table, cls in ((UNET_DEFAULTS, diffusers.UNet2DModel), (SCHEDULER_DEFAULTS, diffusers.DDPMScheduler)):
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
                    for k, p in params.items() if k != "self"}
        # Every key we fill in has the installed diffusers' default (newer releases may add keys).
        ours = {k: (list(v) if isinstance(v, tuple) else v) for k, v in table.items()}
        assert ours == {k: defaults[k] for k in table}


@pytest.mark.parametrize("name,seed_name", [("linear", "sqrt_linear"), ("scaled_linear", "linear"),
                                            ("squaredcos_cap_v2", "cosine"), ("sigmoid", None)])
def test_scheduler_names_map_to_the_same_betas(name, seed_name):
    raw = {"beta_schedule": name, "beta_start": 2e-4, "beta_end": 0.03}
    diffusion, schedule = diffusion_from_scheduler(raw, "test")
    if seed_name is not None:
        assert diffusion.schedule == seed_name and schedule.name == seed_name
    theirs = diffusers.DDPMScheduler(**raw).betas.double()
    # diffusers computes in float32 from the same formula: equal to float32 rounding.
    assert ((schedule.betas - theirs).abs() / theirs).max() < 1e-6
    # The name collision the mapping exists for: the seed's "linear" is not diffusers' "linear".
    if name == "linear":
        other = ddpm.NoiseSchedule.from_name("linear", 1000, linear_start=2e-4, linear_end=0.03).betas
        assert ((other - theirs).abs() / theirs).max() > 0.1


@pytest.mark.parametrize("fields,expected", [
    ({}, {"prediction": "eps", "variance": "fixed_small", "clip_denoised": True}),  # DDPMScheduler's defaults
    ({"prediction_type": "sample", "variance_type": "fixed_large", "clip_sample": False},
     {"prediction": "x0", "variance": "fixed_large", "clip_denoised": False}),
    ({"prediction_type": "v_prediction", "variance_type": "fixed_small_log", "rescale_betas_zero_snr": True,
      "timestep_spacing": "trailing", "steps_offset": 1},
     {"prediction": "v", "variance": "fixed_small", "clip_denoised": True, "rescale_zero_terminal_snr": True}),
])
def test_scheduler_fields_map(fields, expected):
    diffusion, schedule = diffusion_from_scheduler({"_class_name": "DDPMScheduler", **fields}, "test")
    for key, value in expected.items():
        assert getattr(diffusion, key) == value
    assert schedule.rescaled == bool(fields.get("rescale_betas_zero_snr"))


def test_trained_betas_are_used_exactly():
    betas = np.linspace(1e-4, 0.05, 50) ** 0.5 / 5
    diffusion, schedule = diffusion_from_scheduler({"num_train_timesteps": 50, "trained_betas": betas.tolist()}, "t")
    assert np.array_equal(schedule.betas.numpy(), betas) and diffusion.timesteps == 50


@pytest.mark.parametrize("fields,message", [
    ({"thresholding": True}, "thresholding=True has no equivalent"),
    ({"clip_sample_range": 2.0}, "clip_sample_range=2.0"),
    ({"variance_type": "learned"}, "variance_type 'learned' has no equivalent"),
    ({"prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"beta_schedule": "laplace"}, "beta_schedule 'laplace'"),
    ({"trained_betas": [0.1, 0.2]}, "2 trained_betas for num_train_timesteps=1000"),
    ({"rescale_betas_zero_snr": True}, "needs prediction 'v' or 'x0'"),
    ({"_class_name": "ScoreSdeVeScheduler"}, "not a beta-schedule scheduler"),
])
def test_scheduler_values_without_equivalent_are_refused_in_one_line(fields, message):
    with pytest.raises(UserError, match=message) as info:
        diffusion_from_scheduler(fields, "DIR/scheduler_config.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("DIR/scheduler_config.json: ")


def test_pipeline_directory_loads_and_samples_like_diffusers(tmp_path, capsys):
    unet = unet2d()  # flip_sin_to_cos=True, freq_shift=0, 8 heads: diffusers' conventions, not the DDPM ones
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=True)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    run = ddpm.load(tmp_path / "pipe")
    assert run.shape == (3, 16, 16) and run.step is None
    assert run.sample_kwargs == {"prediction": "eps", "variance": "fixed_large", "clip_denoised": True}
    c = run.model.config
    assert (c.flip_sin_to_cos, c.freq_shift, c.num_heads) == (True, 0.0, 8)
    assert ((run.schedule.alphas_cumprod - scheduler.alphas_cumprod.double()).abs().max()) < 1e-6
    x, t = x_T(1), torch.tensor([3, 917])
    with torch.no_grad():
        assert_close(run.model(x, t), unet(x, t).sample, 1e-5)
    assert_close(ours_ddim(run, x_T()), diffusers_ddim(unet, scheduler.config, x_T()))

    # The one command: a downloaded pipeline sampled with DPM-Solver++(2M) in 20 steps.
    out = tmp_path / "x.png"
    argv = ["sample", str(tmp_path / "pipe"), "--sampler", "dpm++2m", "--steps", "20", "--num", "4", "--out", str(out)]
    assert main(argv) == 0
    assert out.is_file() and "dpm++2m, 20 steps" in capsys.readouterr().out


def test_bare_unet_directories_and_old_hub_layouts(tmp_path):
    unet = unet2d(flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None, norm_eps=1e-6)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    x, t = x_T(2), torch.tensor([0, 999])
    with torch.no_grad():
        expected = unet(x, t).sample

    # UNet2DModel.save_pretrained + the scheduler's JSON beside it.
    unet.save_pretrained(tmp_path / "bare")
    assert is_diffusers_dir(tmp_path / "bare")
    with pytest.raises(UserError, match="without a scheduler config"):
        ddpm.load(tmp_path / "bare")
    scheduler.save_pretrained(tmp_path / "elsewhere")
    named = ddpm.load_diffusers(tmp_path / "bare", scheduler_config=tmp_path / "elsewhere" / "scheduler_config.json")
    assert named.config.diffusion.schedule == "cosine"
    scheduler.save_pretrained(tmp_path / "bare")
    run = ddpm.load(tmp_path / "bare")
    assert run.config.diffusion.schedule == "cosine" and run.sample_kwargs["prediction"] == "v"
    with torch.no_grad():
        assert_close(run.model(x, t), expected, 1e-5)

    # A pipeline's unet/ folder finds ../scheduler/.
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    assert ddpm.load(tmp_path / "pipe" / "unet").config.diffusion.schedule == "cosine"

    # google/ddpm-cifar10-32's files: flat, the keys of diffusers 0.0.4 only, pickled weights.
    old = tmp_path / "old"
    old.mkdir()
    keys = ("act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "down_block_types",
            "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
            "mid_block_scale_factor", "norm_eps", "norm_num_groups", "out_channels", "sample_size",
            "time_embedding_type", "up_block_types")
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", **{k: unet.config[k] for k in keys}}
    (old / "config.json").write_text(json.dumps(config))
    torch.save(unet.state_dict(), old / "diffusion_pytorch_model.bin")
    (old / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
        "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
        "variance_type": "fixed_large"}))
    (old / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1", "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"]}))
    run = ddpm.load(old)
    peer = diffusers.UNet2DModel.from_pretrained(old).eval()  # diffusers fills the missing keys the same way
    with torch.no_grad():
        assert_close(run.model(x, t), peer(x, t).sample, 1e-5)
    assert run.sample_kwargs == {"prediction": "eps", "variance": "fixed_large", "clip_denoised": True}


def test_what_does_not_convert_is_refused_in_one_line(tmp_path):
    unet = unet2d()
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({**index, "vqvae": ["diffusers", "VQModel"]}))
    with pytest.raises(UserError, match="with vqvae; only unconditional pixel-space pipelines"):
        ddpm.load(tmp_path / "pipe")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    config_path = tmp_path / "pipe" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    for key, value, message in (("down_block_types", ["SkipDownBlock2D", "AttnDownBlock2D"], "SkipDownBlock2D"),
                                ("downsample_padding", 1, "downsample_padding=1 is not the DDPM layout"),
                                ("sample_size", None, "sample_size None is not one square size")):
        config_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(UserError, match=message) as info:
            ddpm.load(tmp_path / "pipe")
        assert "\n" not in str(info.value)
    config_path.write_text(json.dumps(config))
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        ddpm.load(tmp_path / "pipe")


def make_run(tmp_path, *, diffusion: DiffusionConfig, unet: UNetConfig = SMALL):
    """A run directory whose online and EMA weights are different random networks."""
    config = TrainConfig(model=unet, diffusion=diffusion)
    model, ema = randomized(UNet(unet), seed=1), randomized(UNet(unet), seed=2)
    (tmp_path / "run").mkdir(parents=True)
    save_checkpoint(tmp_path / "run", 7, model, ema, {"step": 7}, config)
    return tmp_path / "run", model, ema


EXPORTS = {
    # (DiffusionConfig, U-Net overrides, expected beta_schedule or None for trained_betas)
    "paper-linear-eps": (DiffusionConfig(schedule="sqrt_linear", variance="fixed_large"), {}, "linear"),
    "seed-linear-x0-noclip": (DiffusionConfig(schedule="linear", prediction="x0", clip_denoised=False),
                              {"flip_sin_to_cos": True, "freq_shift": 0.0, "num_heads": 4}, "scaled_linear"),
    "cosine-v": (DiffusionConfig(schedule="cosine", prediction="v"), {}, "squaredcos_cap_v2"),
    "sqrt-eps": (DiffusionConfig(schedule="sqrt", linear_start=1e-4, linear_end=2e-2), {}, None),
    "rescaled-v": (DiffusionConfig(schedule="sqrt_linear", prediction="v", rescale_zero_terminal_snr=True), {}, None),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_export_loads_in_diffusers_and_samples_the_same(tmp_path, case):
    diffusion, overrides, beta_schedule = EXPORTS[case]
    run_dir, _, ema = make_run(tmp_path, diffusion=diffusion, unet=replace(SMALL, **overrides))
    assert main(["export", str(run_dir), "--format", "diffusers", str(tmp_path / "out")]) == 0
    run = ddpm.load(run_dir)

    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    scheduler, unet = pipe.scheduler, pipe.unet.eval()
    assert isinstance(scheduler, diffusers.DDPMScheduler)
    config = scheduler.config
    if beta_schedule is None:
        assert config.trained_betas is not None
    else:
        assert config.beta_schedule == beta_schedule and config.trained_betas is None
    assert ((run.schedule.alphas_cumprod - scheduler.alphas_cumprod.double()).abs().max()) < 1e-6
    assert (config.variance_type, config.clip_sample) == (diffusion.variance, diffusion.clip_denoised)
    # The EMA weights, computing the same function.
    x, t = x_T(3), torch.tensor([5, 700])
    with torch.no_grad():
        assert_close(unet(x, t).sample, ema(x, t), 1e-5)
    assert_close(ours_ddim(run, x_T()), diffusers_ddim(unet, config, x_T()))
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    # Round trip: ddpm.load of the export samples exactly as the run does.
    back = ddpm.load(tmp_path / "out")
    assert back.sample_kwargs == run.sample_kwargs and back.shape == run.shape
    assert torch.equal(back.schedule.betas, run.schedule.betas)
    assert torch.equal(ours_ddim(back, x_T()), ours_ddim(run, x_T()))


def test_export_refusals_and_cli(tmp_path, capsys):
    run_dir, _, _ = make_run(tmp_path, diffusion=DiffusionConfig())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export", str(run_dir), str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not an empty directory" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"

    # Multi-head attention at two widths: diffusers fixes the head size, ours the head count.
    run_dir, _, _ = make_run(tmp_path / "heads", diffusion=DiffusionConfig(),
                          unet=replace(SMALL, ch_mult=(1, 2), attn_resolutions=(16, 8), num_heads=2))
    with pytest.raises(UserError, match="num_heads=2 at attention widths"):
        export_diffusers(run_dir, tmp_path / "heads-out")
    assert not (tmp_path / "heads-out").exists() and not list(tmp_path.glob(".heads-out*"))

    # --no-ema exports the online weights.
    run_dir, online, _ = make_run(tmp_path / "online", diffusion=DiffusionConfig())
    assert main(["export", str(run_dir), str(tmp_path / "online-out"), "--no-ema"]) == 0
    back = ddpm.load(tmp_path / "online-out")
    x, t = x_T(4), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(back.model(x, t), online(x, t))


def make_distilled_run(tmp_path, steps: int, timesteps: int = 1000):
    """A run directory as ``ddpm distill`` writes one: v-prediction, unclipped, ``steps`` DDIM steps."""
    from ddpm.config import DistillConfig

    diffusion = DiffusionConfig(schedule="cosine", prediction="v", clip_denoised=False, timesteps=timesteps)
    config = TrainConfig(model=SMALL, diffusion=diffusion, distill=DistillConfig(
        teacher="runs/teacher", teacher_checkpoint="runs/teacher/ckpt-0000010/ema.safetensors", teacher_steps=2 * steps,
        steps=steps, iters_per_round=10))
    model, ema = randomized(UNet(SMALL), seed=1), randomized(UNet(SMALL), seed=2)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", 7, model, ema, {"step": 7}, config)
    return tmp_path / "run"


@pytest.mark.parametrize("steps", [1, 4])
def test_distilled_run_exports_as_the_ddim_pipeline_of_its_steps(tmp_path, steps, capsys):
    run_dir = make_distilled_run(tmp_path, steps)
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    assert "DDIMPipeline" in capsys.readouterr().out
    run = ddpm.load(run_dir, fast=False)
    pipe = diffusers.DDIMPipeline.from_pretrained(tmp_path / "out")
    scheduler = pipe.scheduler
    assert isinstance(scheduler, diffusers.DDIMScheduler)
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps, timestep_grid(1000, steps, "trailing"))
    # The whole pipeline call, from its own noise, against ddpm.sample from the same x_T.
    images = pipe(batch_size=2, num_inference_steps=steps, eta=0.0, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # what the pipeline draws on CPU
    with torch.no_grad():
        ours = ddpm.sample(run.model, run.schedule, (2, 3, 16, 16), x_T=x, **run.sample_kwargs,
                           sampler="ddim", steps=steps, eta=0.0)
    theirs = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # the pipeline's [0, 1] HWC output
    assert_close(ours.clamp(-1, 1), theirs, 1e-4)
    # The negative control: the grid is what matches; diffusers' default "leading" spacing does not.
    pipe.scheduler = diffusers.DDIMScheduler.from_config({**scheduler.config, "timestep_spacing": "leading"})
    leading = pipe(batch_size=2, num_inference_steps=steps, eta=0.0, output_type="np",
                   generator=torch.Generator().manual_seed(3)).images
    assert (torch.from_numpy(leading).permute(0, 3, 1, 2) * 2 - 1 - theirs).abs().max() > 0.05


def test_distilled_run_off_diffusers_grid_is_refused(tmp_path, capsys):
    run_dir = make_distilled_run(tmp_path, 4, timesteps=1002)  # diffusers steps by 1002 // 4 = 250, we by 250.5
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "T=1002 is not a multiple of 4" in err
    assert not (tmp_path / "out").exists()

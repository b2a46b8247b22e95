"""diffusers pipeline directories in and out, with nothing but json and safetensors.

In (``load_diffusers``, which ``ddpm.load`` calls for such a directory): what
``DDPMPipeline.save_pretrained`` writes (google/ddpm-cifar10-32 on the Hub has this layout)::

    DIR/model_index.json                         {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    DIR/unet/config.json                         UNet2DModel config
    DIR/unet/diffusion_pytorch_model.safetensors weights (or the older .bin)
    DIR/scheduler/scheduler_config.json          DDPMScheduler (or another beta-schedule scheduler)

or a bare ``UNet2DModel.save_pretrained`` directory with a ``scheduler_config.json`` beside its
weights (``scheduler.save_pretrained(DIR)``) or in ``../scheduler/``. The U-Net is converted by
``ddpm.nets.convert`` (the DDPM layout, either sinusoidal-embedding convention). Scheduler fields:

    num_train_timesteps            -> timesteps
    beta_schedule "linear"         -> "sqrt_linear" (the paper's linear; the seed's "linear" is ...)
                  "scaled_linear"  -> "linear" (... linspace(sqrt(beta_start), sqrt(beta_end))**2)
                  "squaredcos_cap_v2" -> "cosine" with cosine_s = 0.008 (the same formula, eq. 17)
                  "sigmoid"        -> its betas, computed in float64
    beta_start, beta_end           -> linear_start, linear_end
    trained_betas                  -> NoiseSchedule(trained_betas)
    prediction_type epsilon / sample / v_prediction -> prediction eps / x0 / v
    variance_type fixed_small(_log), fixed_large, learned_range -> variance of the same name
    clip_sample                    -> clip_denoised (clip_sample_range must be 1)
    rescale_betas_zero_snr         -> rescale_zero_terminal_snr

``thresholding`` and any other value without an equivalent are refused with one line. Keys that
only configure diffusers' own sampling (``timestep_spacing``, ``steps_offset``,
``set_alpha_to_one``, solver options) are ignored: ddpm's samplers take their own ``--steps``
and ``spacing``. diffusers stores betas and abar in float32; ddpm computes the named schedules
in float64 from the same formulas, so the two agree to float32 rounding. A pipeline holds one
set of weights (usually the EMA), so ``ema=`` does not apply. ``DiffusionConfig`` has no field
for explicit betas: for ``trained_betas`` and ``sigmoid`` the returned ``schedule`` holds them
and ``config.diffusion.schedule`` is a placeholder.

Out (``export_diffusers``, ``ddpm export RUN --format diffusers OUT``): the same layout, which
``DDPMPipeline.from_pretrained(OUT)`` loads: the EMA weights, the schedule by name where
diffusers has the same formula and as ``trained_betas`` otherwise (the seed's ``sqrt``, a
cosine with another offset, a rescaled schedule), prediction, variance and clipping.

A distilled run (``ddpm distill``) exports as a ``DDIMPipeline`` instead: its DDIMScheduler has
``timestep_spacing="trailing"``, ``set_alpha_to_one=True``, v-prediction and no clipping, and
``pipe(num_inference_steps=N, eta=0.0)`` then takes exactly the student's N deterministic steps.
diffusers steps from t to t - T // N, so this holds where T is a multiple of N (checked against
the run's grid; otherwise the export is refused with one line).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from ..config import DataConfig, DiffusionConfig, SampleConfig, TrainConfig
from ..core.diffusion import VARIANCES
from ..core.schedules import NoiseSchedule, make_beta_schedule
from ..errors import UserError, first_line
from ..nets.convert import convert_diffusers_state_dict, diffusers_state_and_config
from ..nets.unet import UNet
from ..sampling.grids import timestep_grid
from .checkpoint import read_weights
from .files import atomic_folder
from .state import load_tensors

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The diffusers release whose file format this module writes (every key below exists there).
FORMAT_VERSION = "0.30.0"

# UNet2DModel.__init__ defaults: a config.json written by an older diffusers omits newer keys,
# and diffusers fills them with these (tests compare this table with the installed signature).
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# DDPMScheduler.__init__ defaults, used for keys a scheduler config leaves out.
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# Schedulers of a discrete beta schedule: all describe the same forward process as DDPMScheduler.
SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DDPMParallelScheduler", "DDIMParallelScheduler",
)
_NAMED = {"linear": "sqrt_linear", "scaled_linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers -> seed
_COSINE_S = 0.008  # diffusers' squaredcos_cap_v2 offset
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "learned_range": "learned_range"}  # fixed_small_log: the same sigma, computed via its log
_REFUSED_IF_SET = ("thresholding", "use_flow_sigmas", "use_dynamic_shifting")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _is_unet_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError, AttributeError):
        return False


def is_diffusers_dir(path: str | Path) -> bool:
    """True for a diffusers pipeline directory or a saved UNet2DModel (never for a ddpm run)."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()
                              or _is_unet_dir(path))


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(the U-Net's folder, the scheduler config or None) of a pipeline or UNet2DModel directory.

    Pipelines keep the U-Net in unet/ and the scheduler in scheduler/; older Hub repos (the
    google/ddpm-* ones) also hold both flat at the top; a bare U-Net may have the scheduler's
    JSON beside it or in ../scheduler/ (when the path given is a pipeline's unet/ folder).
    """
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        extra = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v
                       and v[0] is not None and k not in ("unet", "scheduler"))
        if extra:
            raise UserError(f"{path}: a {index.get('_class_name', 'pipeline')} with {', '.join(extra)}; only "
                            "unconditional pixel-space pipelines (a unet and a scheduler, e.g. DDPMPipeline) load")
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    candidates = [path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                  path.parent / "scheduler" / "scheduler_config.json"]
    return unet_dir, next((c for c in candidates if c.is_file()), None)


def _read_unet_weights(unet_dir: Path) -> tuple[dict, Path]:

    for name in WEIGHT_FILES:
        file = unet_dir / name
        if not file.is_file():
            continue
        if name.endswith(".safetensors"):
            return read_weights(file)[0], file
        return load_tensors(file, "weights file"), file  # the older pickle format: tensors only
    raise UserError(f"{unet_dir}: no {' or '.join(WEIGHT_FILES)} (sharded or variant weights are not supported)")


def _unet_from_diffusers(unet_dir: Path):

    raw = _read_json(unet_dir / "config.json")
    if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{unet_dir / 'config.json'}: a {raw['_class_name']}; only UNet2DModel converts")
    dc = {**UNET_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    bad = ([t for t in dc["down_block_types"] if t not in ("DownBlock2D", "AttnDownBlock2D")]
           + [t for t in dc["up_block_types"] if t not in ("UpBlock2D", "AttnUpBlock2D")]
           + ([] if dc["mid_block_type"] == "UNetMidBlock2D" else [str(dc["mid_block_type"])]))
    size = dc["sample_size"]
    if bad:
        raise UserError(f"{unet_dir}: block type {bad[0]} is not part of the DDPM layout")
    if size is None or (not isinstance(size, int) and len(set(size)) != 1):
        raise UserError(f"{unet_dir}: sample_size {size!r} is not one square size")
    tensors, file = _read_unet_weights(unet_dir)
    try:
        sd, config = diffusers_state_and_config(tensors, None, dc)
        model = UNet(config)
        model.load_state_dict(convert_diffusers_state_dict(sd, model.state_dict()))
    except ValueError as exc:
        raise UserError(f"{unet_dir}: {first_line(exc)}") from None
    return model, file


def diffusion_from_scheduler(raw: dict, where: str):
    """(DiffusionConfig, NoiseSchedule) of a diffusers scheduler config (see the module docstring)."""

    cls = raw.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULERS:
        raise UserError(f"{where}: {cls} is not a beta-schedule scheduler; supported: {', '.join(SCHEDULERS)}")
    sc = {**SCHEDULER_DEFAULTS, **raw}
    for key in _REFUSED_IF_SET:
        if sc.get(key):
            raise UserError(f"{where}: {key}={sc[key]!r} has no equivalent in ddpm")
    if sc["prediction_type"] not in _PREDICTIONS:
        raise UserError(f"{where}: prediction_type {sc['prediction_type']!r} has no equivalent; "
                        f"supported: {', '.join(_PREDICTIONS)}")
    variance = _VARIANCES.get(sc["variance_type"])
    if variance not in VARIANCES:
        raise UserError(f"{where}: variance_type {sc['variance_type']!r} has no equivalent; "
                        f"supported: {', '.join(k for k, v in _VARIANCES.items() if v in VARIANCES)}")
    if sc["clip_sample"] and float(sc["clip_sample_range"]) != 1.0:
        raise UserError(f"{where}: clip_sample_range={sc['clip_sample_range']} has no equivalent "
                        "(ddpm clips x0 to [-1, 1])")
    try:
        T, start, end = int(sc["num_train_timesteps"]), float(sc["beta_start"]), float(sc["beta_end"])
    except (TypeError, ValueError):
        raise UserError(f"{where}: num_train_timesteps, beta_start and beta_end must be numbers") from None
    betas, name = None, sc["beta_schedule"]
    if sc["trained_betas"] is not None:
        betas = np.asarray(sc["trained_betas"], dtype=np.float64)
        if betas.shape != (T,):
            raise UserError(f"{where}: {betas.size} trained_betas for num_train_timesteps={T}")
    elif name == "sigmoid":
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (end - start) + start
    elif name not in _NAMED:
        raise UserError(f"{where}: beta_schedule {name!r} has no equivalent; supported: "
                        f"{', '.join([*_NAMED, 'sigmoid'])} or trained_betas")
    try:
        diffusion = DiffusionConfig(
            schedule=_NAMED.get(name, "sqrt_linear") if betas is None else "sqrt_linear", timesteps=T,
            linear_start=start, linear_end=end, cosine_s=_COSINE_S, prediction=_PREDICTIONS[sc["prediction_type"]],
            rescale_zero_terminal_snr=bool(sc["rescale_betas_zero_snr"]), variance=variance,
            clip_denoised=bool(sc["clip_sample"]))
        if betas is None:
            return diffusion, diffusion.make_schedule()
        schedule = NoiseSchedule(betas, rescale_to_zero_terminal_snr=diffusion.rescale_zero_terminal_snr,
                                 name=f"diffusers {'trained_betas' if sc['trained_betas'] is not None else name}")
        return diffusion, schedule
    except (ValueError, UserError) as exc:
        raise UserError(f"{where}: {first_line(exc)}") from None


def read_diffusers(path: str | Path, *, scheduler_config: str | Path | None = None):
    """(model, schedule, TrainConfig, weights file) of a diffusers pipeline or UNet2DModel directory
    (module docstring); ``ddpm.io.run.load_diffusers`` makes a ``LoadedRun`` of them.

    ``scheduler_config`` names the scheduler's JSON explicitly (default: found beside the U-Net).
    """

    path = Path(path)
    unet_dir, sched_path = _locate(path)
    sched_path = Path(scheduler_config) if scheduler_config is not None else sched_path
    if sched_path is None:
        raise UserError(f"{path}: a UNet2DModel without a scheduler config; save one beside it "
                        f"(DDPMScheduler(...).save_pretrained('{path}')) so its noise schedule is known")
    raw = _read_json(sched_path)
    diffusion, schedule = diffusion_from_scheduler(raw, str(sched_path))
    model, weights = _unet_from_diffusers(unet_dir)
    c = model.config
    want = c.in_channels * (2 if diffusion.variance == "learned_range" else 1)
    if c.out_channels != want:
        raise UserError(f"{unet_dir}: out_channels={c.out_channels} with in_channels={c.in_channels} and "
                        f"variance_type {raw.get('variance_type', 'fixed_small')!r} (expected {want})")
    # Previews (ddpm sample's defaults) as the pipeline's own: DDIMPipeline 50 steps, DDPMPipeline all T.
    ddim = raw.get("_class_name") == "DDIMScheduler"
    preview = SampleConfig(sampler="ddim", steps=min(50, diffusion.timesteps)) if ddim else SampleConfig()
    config = TrainConfig(model=c, diffusion=diffusion, sample=preview, name=f"diffusers:{path.name}",
                         data=DataConfig(source=f"unknown (diffusers pipeline {path.name}: pass --data)"))
    return model, schedule, config, weights


# ---------------------------------------------------------------------------------------------
# Out: ddpm UNet -> UNet2DModel names (the inverse of convert.py's renames).

_EXPORT_RENAMES = [  # (pattern on our key, diffusers replacement), applied in order
    (r"^temb_dense0\.", "time_embedding.linear_1."), (r"^temb_dense1\.", "time_embedding.linear_2."),
    (r"^(down|up)\.(\d+)\.res\.", r"\1_blocks.\2.resnets."),
    (r"^(down|up)\.(\d+)\.attn\.", r"\1_blocks.\2.attentions."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^mid_res1\.", "mid_block.resnets.0."), (r"^mid_res2\.", "mid_block.resnets.1."),
    (r"^mid_attn\.", "mid_block.attentions.0."), (r"^norm_out\.", "conv_norm_out."),
    (r"\.temb_proj\.", ".time_emb_proj."), (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"\.proj_out\.", ".to_out.0."),
]


def to_diffusers_state_dict(sd: dict) -> dict:
    """Our U-Net's state dict under UNet2DModel's names, with q, k, v split again."""
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in _EXPORT_RENAMES:
            new = re.sub(pattern, repl, new)
        if re.search(r"\.qkv\.(weight|bias)$", new):
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[new.replace(".qkv.", f".{part}.")] = chunk.contiguous()
        else:
            out[new] = value.contiguous()
    return out


def unet2d_config(c) -> dict:
    """The UNet2DModel config.json of a ``UNetConfig``; a network diffusers cannot express is refused."""
    if getattr(c, "num_classes", None) is not None:
        raise UserError("a class-conditional U-Net has no DDPMPipeline equivalent (export unconditional runs)")
    if not c.resamp_with_conv:
        raise UserError("resamp_with_conv=False has no UNet2DModel equivalent (diffusers resamples with convs)")
    channels = [c.ch * m for m in c.ch_mult]
    attn = [r in c.attn_resolutions for r in c.resolutions]
    attn_ch = {ch for ch, a in zip(channels, attn) if a} | ({channels[-1]} if c.mid_attn else set())
    if c.num_heads > 1 and len(attn_ch) > 1:  # diffusers fixes the head size, ours the head count
        raise UserError(f"num_heads={c.num_heads} at attention widths {sorted(attn_ch)} has no UNet2DModel equivalent")
    freq_shift = int(c.freq_shift) if float(c.freq_shift).is_integer() else c.freq_shift
    return {
        **UNET_DEFAULTS, "_class_name": "UNet2DModel", "_diffusers_version": FORMAT_VERSION,
        "sample_size": c.image_size, "in_channels": c.in_channels, "out_channels": c.out_channels,
        "freq_shift": freq_shift, "flip_sin_to_cos": c.flip_sin_to_cos,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels, "layers_per_block": c.num_res_blocks, "downsample_padding": 0,
        "dropout": c.dropout, "attention_head_dim": attn_ch.pop() // c.num_heads if c.num_heads > 1 and attn_ch else None,
        "norm_num_groups": c.norm_groups, "norm_eps": c.norm_eps, "add_attention": c.mid_attn,
    }


def scheduler_config(diffusion, schedule) -> dict:
    """The DDPMScheduler config of a run: its schedule by diffusers' name where that is the same
    formula (checked against the betas in use), else as ``trained_betas``."""

    d = diffusion
    name = {v: k for k, v in _NAMED.items()}.get(schedule.name)
    named = name is not None and not schedule.rescaled and (name != "squaredcos_cap_v2" or d.cosine_s == _COSINE_S)
    betas = schedule.betas.cpu().numpy()
    if named:
        same = make_beta_schedule(schedule.name, len(betas), d.linear_start, d.linear_end, d.cosine_s)
        named = np.array_equal(same, betas)
    prediction = {v: k for k, v in _PREDICTIONS.items()}[d.prediction]
    return {
        **SCHEDULER_DEFAULTS, "_class_name": "DDPMScheduler", "_diffusers_version": FORMAT_VERSION,
        "num_train_timesteps": len(betas), "beta_start": d.linear_start, "beta_end": d.linear_end,
        "beta_schedule": name if named else "linear", "trained_betas": None if named else betas.tolist(),
        "variance_type": d.variance, "clip_sample": d.clip_denoised, "prediction_type": prediction,
    }


def ddim_scheduler_config(diffusion, schedule, steps: int) -> dict:
    """The DDIMScheduler config under which ``DDIMPipeline(num_inference_steps=steps, eta=0)`` takes
    the steps of a distilled run: the "trailing" grid, then x0 (``set_alpha_to_one``)."""
    T = schedule.num_timesteps
    ours = timestep_grid(T, steps, "trailing").tolist() + [-1]
    # DDIMScheduler.set_timesteps("trailing") and its step(): from t to t - T // N; -1 is x0.
    visited = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1).tolist()
    if visited[:1] + [t - T // steps for t in visited] != ours:
        raise UserError(f"diffusers' DDIMScheduler steps by T // N = {T // steps}, which misses this run's {steps}-step "
                        f"grid {ours[:-1]} (T={T} is not a multiple of {steps}); sample it with `ddpm sample`")
    base = scheduler_config(diffusion, schedule)
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
            "prediction_type", "thresholding", "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value",
            "rescale_betas_zero_snr")
    return {"_class_name": "DDIMScheduler", "_diffusers_version": FORMAT_VERSION, **{k: base[k] for k in keep},
            "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing"}


def write_pipeline(model, diffusion, schedule, out: Path, *, distilled_steps: int | None = None) -> Path:
    """Write ``model`` (a ``UNet``) with its schedule as a DDPMPipeline directory ``out`` (which must
    not exist or be empty), or, with ``distilled_steps``, as the DDIMPipeline that samples it in
    those steps: written in a temporary sibling and renamed into place, so a failed export leaves
    nothing behind."""
    unet = unet2d_config(model.config)
    if distilled_steps is None:
        pipeline, scheduler = "DDPMPipeline", scheduler_config(diffusion, schedule)
    else:
        pipeline, scheduler = "DDIMPipeline", ddim_scheduler_config(diffusion, schedule, distilled_steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": FORMAT_VERSION,
             "scheduler": ["diffusers", scheduler["_class_name"]], "unet": ["diffusers", "UNet2DModel"]}
    files = {name: (json.dumps(data, indent=2) + "\n").encode("utf-8") for name, data in (
        ("model_index.json", index), ("unet/config.json", unet), ("scheduler/scheduler_config.json", scheduler))}
    weights = to_diffusers_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    files[f"unet/{WEIGHT_FILES[0]}"] = safetensors_bytes(weights, metadata={"format": "pt"})
    atomic_folder(out, files)  # an empty ``out`` is replaced
    return out

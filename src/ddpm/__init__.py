"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) end to end.

Names are resolved lazily so that ``import ddpm`` (and the CLI's start-up) stays fast and the
heavy pieces load only when used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "make_beta_schedule": "core.schedules",
    "NoiseSchedule": "core.schedules",
    "SCHEDULES": "core.schedules",
    "q_sample": "core.diffusion",
    "q_posterior_mean_variance": "core.diffusion",
    "predict_x0_from_eps": "core.diffusion",
    "predict_eps_from_x0": "core.diffusion",
    "v_from_x0_eps": "core.diffusion",
    "x0_eps_from_v": "core.diffusion",
    "training_loss": "core.diffusion",
    "rescale_zero_terminal_snr": "core.schedules",
    "q_mean_variance": "core.diffusion",
    "p_mean_variance": "core.diffusion",
    "x0_eps_from_output": "core.diffusion",
    "normal_kl": "core.diffusion",
    "discretized_gaussian_log_likelihood": "core.diffusion",
    "extract": "core.diffusion",
    "split_output": "core.diffusion",
    "vlb_term": "core.diffusion",
    "respaced_schedule": "core.diffusion",
    "VARIANCES": "core.diffusion",
    "analytic_variance": "core.analytic",
    "AnalyticVariance": "core.analytic",
    "reverse_variances": "core.analytic",
    "LossAwareTimestepSampler": "training.timestep_sampling",
    "sample": "sampling.samplers",
    "SAMPLERS": "sampling.samplers",
    "SPACINGS": "sampling.samplers",
    "default_steps": "sampling.samplers",
    "timestep_grid": "sampling.samplers",
    "per_sample_seeds": "sampling.samplers",
    "gaussian_noise": "sampling.samplers",
    "guided_model": "sampling.guidance",
    "inpaint": "sampling.inpainting",
    "invert": "sampling.inversion",
    "interpolate": "sampling.interpolation",
    "UNet": "nets.unet",
    "UNetConfig": "nets.unet_config",
    "MLPDenoiser": "nets.mlp",
    "MLPConfig": "nets.mlp",
    "train": "training.loop",
    "distill": "training.distill",
    "TrainConfig": "config",
    "load": "io.run",
    "LoadedRun": "io.run",
    "load_diffusers": "io.run",
    "export_diffusers": "io.run",
    "resolve_amp": "core.device",
    "TrainingInterrupted": "training.loop",
    "get_preset": "presets",
    "resolve_config": "presets",
    "vlb_terms": "core.nll",
    "nll_bpd": "core.nll",
    "compute_fid": "evaluation.evaluate",
    "toy_metrics": "evaluation.evaluate",
    "energy_distance": "evaluation.evaluate",
    "mmd_rbf": "evaluation.evaluate",
    "periodic_eval": "evaluation.evaluate",
    "EvalConfig": "config",
    "frechet_distance": "evaluation.fid",
    "open_source": "data.sources",
    "open_data": "data.sources",
    "require_labels": "data.sources",
    "write_report": "evaluation.report",
    "toy_sample": "data.sources",
    "toy_log_density": "data.sources",
    "TOY_SETS": "data.sources",
    "save_grid": "evaluation.viz",
    "to_uint8": "evaluation.viz",
    "save_scatter": "evaluation.viz",
    "save_trajectory_strip": "evaluation.viz",
    "plot_schedules": "evaluation.viz",
    "schedule_table": "evaluation.viz",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

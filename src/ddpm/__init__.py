"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) end to end.

Names are resolved lazily so that ``import ddpm`` (and the CLI's start-up) stays fast and the
heavy pieces load only when used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "make_beta_schedule": "schedules",
    "NoiseSchedule": "schedules",
    "SCHEDULES": "schedules",
    "q_sample": "diffusion",
    "q_posterior_mean_variance": "diffusion",
    "predict_x0_from_eps": "diffusion",
    "predict_eps_from_x0": "diffusion",
    "v_from_x0_eps": "diffusion",
    "x0_eps_from_v": "diffusion",
    "training_loss": "diffusion",
    "rescale_zero_terminal_snr": "schedules",
    "q_mean_variance": "diffusion",
    "p_mean_variance": "diffusion",
    "x0_eps_from_output": "diffusion",
    "normal_kl": "diffusion",
    "discretized_gaussian_log_likelihood": "diffusion",
    "extract": "diffusion",
    "split_output": "diffusion",
    "vlb_term": "diffusion",
    "respaced_schedule": "diffusion",
    "VARIANCES": "diffusion",
    "analytic_variance": "analytic",
    "AnalyticVariance": "analytic",
    "reverse_variances": "analytic",
    "LossAwareTimestepSampler": "timestep_sampling",
    "sample": "samplers",
    "SAMPLERS": "samplers",
    "SPACINGS": "samplers",
    "default_steps": "samplers",
    "timestep_grid": "samplers",
    "per_sample_seeds": "samplers",
    "gaussian_noise": "samplers",
    "guided_model": "guidance",
    "inpaint": "inpainting",
    "invert": "inversion",
    "interpolate": "interpolation",
    "UNet": "unet",
    "UNetConfig": "unet_config",
    "MLPDenoiser": "mlp",
    "MLPConfig": "mlp",
    "train": "training",
    "TrainConfig": "config",
    "load": "loading",
    "LoadedRun": "loading",
    "load_diffusers": "diffusers_io",
    "export_diffusers": "diffusers_io",
    "resolve_amp": "accel",
    "TrainingInterrupted": "training",
    "get_preset": "presets",
    "resolve_config": "presets",
    "vlb_terms": "nll",
    "nll_bpd": "nll",
    "compute_fid": "evaluate",
    "toy_metrics": "evaluate",
    "energy_distance": "evaluate",
    "mmd_rbf": "evaluate",
    "periodic_eval": "evaluate",
    "EvalConfig": "config",
    "frechet_distance": "fid",
    "open_source": "data",
    "open_data": "data",
    "require_labels": "data",
    "write_report": "report",
    "toy_sample": "data",
    "toy_log_density": "data",
    "TOY_SETS": "data",
    "save_grid": "viz",
    "to_uint8": "viz",
    "save_scatter": "viz",
    "save_trajectory_strip": "viz",
    "plot_schedules": "viz",
    "schedule_table": "viz",
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

"""The typed run configuration (one dataclass per concern), its validation and its loading.

A ``TrainConfig`` is plain data: it round-trips through JSON (``to_dict``/``from_dict``), is saved
as ``config.json`` in every run directory and inside every checkpoint, and is validated when it is
built, so a bad value fails before any work starts with a one-line message listing what is allowed.
The named recipes built from it are in ``ddpm.presets``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .core.device import AMP_MODES
from .core.diffusion import OBJECTIVES, PREDICTIONS, VARIANCES, WEIGHTINGS, objective_problem, variance_channels_problem
from .core.schedules import SCHEDULES, NoiseSchedule
from .core.shapes import image_hw
from .errors import UserError, first_line
from .nets.mlp import MLPConfig, MLPDenoiser
from .nets.unet import UNet
from .nets.unet_config import UNetConfig
from .sampling.guidance import check_interval
from .sampling.samplers import SAMPLERS

# The choices of the ``Literal[...]`` fields below are the tuples of the modules that implement
# them, so a new schedule, prediction, variance or sampler is accepted here the day it is added.
AMP_CHOICES = ("auto", *AMP_MODES)


# Bounds that a real run meets, for the integers a config (often read from a file) may hold: a
# value past them is a mistake or a crafted file, refused before it can size a loop or an
# allocation (a step count of 1e300 would train without end; T of 1e9 would build float64 arrays of
# 8 GB each). Sizes of tensors (batch, image) are checked against the memory available where they
# are allocated instead. Every other integer must fit in int64, as torch takes it.
INT_LIMITS = {
    "steps": 10**8,  # training, sampling, evaluation steps: 100x the paper's 800k-step CIFAR-10 run
    "timesteps": 100_000,  # T of the schedule (the paper: 1,000)
    "num": 10**8,  # samples drawn (50,000 for FID)
    "seed": 2**32 - 1,  # as numpy's; the training loop's generators take seed * 1,000,003 + step
    "iters_per_round": 10**8,
    "teacher_steps": 100_000,
}
DEFAULT_INT_LIMIT = 2**63 - 1
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list"}
_KINDS = {float: (int, float), tuple: (tuple, list)}  # an int is a number; a list stands for a tuple


def _check_fields(obj: Any) -> None:
    """Refuse a field whose value is not of its annotated type (naming the field, the type found
    and the type wanted), an integer past its bound (``INT_LIMITS``), or a value outside its
    ``Literal[...]`` annotation (listing the allowed values)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise ValueError(f"{f.name} {value!r} not allowed; choose one of {', '.join(map(str, allowed))}")
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
        if value is None and type(None) in options:
            continue
        wanted = [t for t in options if t in _TYPE_NAMES]
        if not wanted or len(options) > 2 or any(_is_kind(value, t) for t in wanted):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _int_limit(f.name):
                shown = value if abs(value) < 10**15 else f"{float(value):.3g}"
                raise ValueError(f"{f.name} {shown} is past the limit of {_int_limit(f.name)} that a real run stays "
                                 f"within")
            continue
        raise ValueError(f"{f.name} must be {' or '.join(_TYPE_NAMES[t] for t in wanted)}"
                         f"{' or null' if type(None) in options else ''}, got {type(value).__name__} {value!r}")


def _is_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, _KINDS.get(kind, kind))


def _int_limit(name: str) -> int:
    return INT_LIMITS.get(name, DEFAULT_INT_LIMIT)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class DiffusionConfig:
    """The forward process (seed schedules) and what the network predicts."""

    schedule: Literal[SCHEDULES] = "sqrt_linear"  # paper's linear = seed's sqrt_linear
    timesteps: int = 1000
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    prediction: Literal[PREDICTIONS] = "eps"
    weighting: Literal[WEIGHTINGS] = "simple"
    min_snr_gamma: float = 5.0
    rescale_zero_terminal_snr: bool = False
    variance: Literal[VARIANCES] = "fixed_small"  # sigma_t^2 used by ancestral sampling
    clip_denoised: bool = True
    # L_simple (L_hybrid = L_simple + vlb_weight * L_vlb with learned variances), or L_vlb alone with
    # loss-aware sampling of t (Nichol & Dhariwal 2021, sections 3.1 and 3.3)
    objective: Literal[OBJECTIVES] = "simple"
    vlb_weight: float = 0.001

    def __post_init__(self):
        _check_fields(self)
        _require(self.timesteps >= 2, f"timesteps must be >= 2, got {self.timesteps}")
        _require(0 < self.linear_start <= self.linear_end < 1, "need 0 < linear_start <= linear_end < 1")
        _require(self.cosine_s >= 0 and self.min_snr_gamma > 0, "cosine_s must be >= 0 and min_snr_gamma > 0")
        _require(
            not (self.rescale_zero_terminal_snr and self.prediction == "eps"),
            "rescale_zero_terminal_snr needs prediction 'v' or 'x0' (eps cannot recover x0 at zero SNR)",
        )
        _require(self.vlb_weight >= 0, f"vlb_weight must be >= 0, got {self.vlb_weight}")
        problem = objective_problem(self.objective, self.variance, self.weighting)
        _require(problem is None, problem)

    def make_schedule(self):

        return NoiseSchedule.from_name(
            self.schedule, self.timesteps, linear_start=self.linear_start, linear_end=self.linear_end,
            cosine_s=self.cosine_s, rescale_to_zero_terminal_snr=self.rescale_zero_terminal_snr,
        )


@dataclass
class OptimConfig:
    """Adam (AdamW when weight_decay > 0) with linear warm-up, then constant or cosine-decayed lr."""

    lr: float = 2e-4
    warmup: int = 5000
    decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 switches clipping off
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8

    def __post_init__(self):
        _check_fields(self)
        self.betas = tuple(float(b) for b in self.betas)
        _require(0 < self.lr < math.inf, f"lr must be > 0 and finite, got {self.lr}")
        _require(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        _require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.weight_decay >= 0 and self.eps > 0, "weight_decay must be >= 0 and eps > 0")


@dataclass
class LoopConfig:
    """Length, batch, EMA, logging/checkpoint cadence and fast paths of the training loop."""

    steps: int = 800_000
    batch_size: int = 128  # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1
    ema_decay: float = 0.9999
    ema_warmup: int = 0  # decay_t = min(ema_decay, (1 + t) / (ema_warmup + t)); 0 = no warm-up
    seed: int = 0
    log_every: int = 100
    sample_every: int = 10_000  # 0 = previews only at the end
    ckpt_every: int = 10_000  # 0 = checkpoint only at the end
    keep_last: int = 3
    max_minutes: Optional[float] = None  # time budget: stop (and save) once spent; the lr decays over it (ddpm.training.budget)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal[AMP_CHOICES] = "auto"  # auto = bf16 on CUDA and on CPUs with native bf16, else off (accel.resolve_amp)
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0  # background threads fetching the next batches (ddpm.data.loader.Prefetcher)
    progress: bool = True
    max_nonfinite: int = 20  # steps in a row with a NaN/Inf loss or gradient (each skipped) that stop the run
    # classifier-free guidance training (Ho & Salimans 2022): the share of labels replaced by the
    # null label, so that one network learns the conditional and the unconditional model; read only
    # by class-conditional runs (model.num_classes)
    cond_drop_prob: float = 0.1
    # autoguidance (Karras et al. 2024): at this share of the run's progress (ddpm.training.budget.schedule_progress)
    # the EMA weights are kept as the guide, saved in every later checkpoint (guide.safetensors)
    # and used by samples with sample.autoguidance != 1; None = no guide
    guide_at: Optional[float] = None

    def __post_init__(self):
        _check_fields(self)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last", "max_nonfinite"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ema_warmup", "seed", "sample_every", "ckpt_every", "num_workers"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        _require(self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}")
        _require(self.batch_size % self.grad_accum == 0, f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        _require(0 <= self.cond_drop_prob <= 1, f"cond_drop_prob must lie in [0, 1], got {self.cond_drop_prob}")
        _require(self.guide_at is None or 0 < self.guide_at < 1, f"guide_at must lie in (0, 1), got {self.guide_at}")


@dataclass
class DataConfig:
    """Where the training data comes from (a ``ddpm.data.sources.open_source`` spec) and its augmentation."""

    source: str = "mnist"
    hflip: bool = False  # random horizontal flip (the paper's CIFAR-10 augmentation)
    image_size: Union[int, tuple, None] = None  # S or (H, W): resize and centre-crop; None keeps the source size
    channels: Optional[int] = None  # 1, 3 or 4 (RGBA); None keeps the source's
    image_column: Optional[str] = None  # hf: sources: default the first Image feature
    label_column: Optional[str] = None  # hf: sources: default a ClassLabel named label, labels, class, ...
    # class k's name, k = 0..K-1, for class-conditional runs: taken from the data when the run starts
    # (MNIST digits, a folder's sub-folder names), so that a run alone maps names to labels
    class_names: Optional[tuple] = None

    def __post_init__(self):
        if self.class_names is not None and isinstance(self.class_names, list):
            self.class_names = tuple(self.class_names)
        _check_fields(self)
        _require(bool(self.source), "data source must be a non-empty string")
        if self.image_size is not None:

            image_hw(self.image_size)  # ValueError unless S or (H, W) of positive integers
        _require(self.channels in (None, 1, 3, 4), f"channels must be 1, 3 or 4, got {self.channels}")
        if self.class_names is not None:
            self.class_names = tuple(self.class_names)
            _require(all(isinstance(n, str) for n in self.class_names), "data.class_names must be a list of strings")


@dataclass
class SampleConfig:
    """How previews (and, by default, ``ddpm sample``) draw from the EMA model."""

    sampler: Literal[SAMPLERS] = "ddpm"
    steps: Optional[int] = None  # None = all T steps
    eta: float = 0.0
    num: int = 64
    # classifier-free guidance scale of class-conditional runs (1 = plain conditional, 0 =
    # unconditional); previews draw one row per class with it
    guidance: float = 1.0
    # autoguidance scale w (Karras et al. 2024): guide + w (model - guide), the guide being the EMA
    # kept at train.guide_at; 1 = off (also when a checkpoint holds no guide)
    autoguidance: float = 1.0
    # both guidances only for model timesteps t in [t_lo, t_hi] (Kynkaanniemi et al. 2024); None: every step
    guidance_interval: Optional[tuple] = None

    def __post_init__(self):
        if isinstance(self.guidance_interval, list):
            self.guidance_interval = tuple(self.guidance_interval)
        _check_fields(self)
        _require(self.steps is None or self.steps >= 1, f"sample steps must be >= 1, got {self.steps}")
        _require(self.eta >= 0 and self.num >= 1, "eta must be >= 0 and num >= 1")
        _require(math.isfinite(self.guidance), f"sample.guidance must be a finite number, got {self.guidance}")
        _require(math.isfinite(self.autoguidance), f"sample.autoguidance must be a finite number, got {self.autoguidance}")


@dataclass
class EvalConfig:
    """Evaluation during training every ``every`` steps (0 = off, the default), on rank 0 with the
    EMA model and a small sample count (``ddpm.evaluation.evaluate.periodic_eval``; one JSON line per
    evaluation in RUN_DIR/eval/periodic.jsonl).

    ``metrics``: any of "toy" (toy runs), "nll" (stratified bound on ``num`` data items), "fid"
    (needs Inception weights and a reference, ``fid_ref``). Samples use ``sampler``/``steps``.
    """

    every: int = 0
    metrics: tuple = ("toy", "nll")
    num: int = 256
    sampler: Literal[SAMPLERS] = "ddim"
    steps: int = 50
    nll_timesteps: int = 32
    fid_ref: Optional[str] = None
    ref_data: Optional[str] = None
    inception_weights: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        _check_fields(self)
        self.metrics = tuple(self.metrics)
        allowed = ("toy", "nll", "fid")
        bad = [m for m in self.metrics if m not in allowed]
        _require(not bad, f"unknown periodic metric {bad[0]!r}; choose from {', '.join(allowed)}" if bad else "")
        _require(self.every >= 0 and self.num >= 2, "periodic eval needs every >= 0 and num >= 2")
        _require(self.steps >= 1 and self.nll_timesteps >= 1, "eval steps and nll_timesteps must be >= 1")


@dataclass
class DistillConfig:
    """What a distilled run (``ddpm distill``, ``ddpm.training.distill``) was distilled from and for:
    it samples with exactly ``steps`` deterministic DDIM steps on the ``spacing`` grid, no others.

    ``teacher`` is the teacher's run directory, ``teacher_checkpoint`` the weights file used (its
    ``teacher_step``), sampled on a ``teacher_steps`` grid with the guidance baked in
    (``teacher_guidance``, ``teacher_autoguidance``, ``teacher_guidance_interval``); ``iters_per_round``
    iterations per halving.
    """

    teacher: str
    teacher_checkpoint: str
    teacher_steps: int
    steps: int
    iters_per_round: int
    teacher_step: Optional[int] = None
    teacher_guidance: float = 1.0
    teacher_autoguidance: float = 1.0
    teacher_guidance_interval: Optional[tuple] = None  # the teacher's sample.guidance_interval
    # a first round on the teacher's own grid, one student step per guided teacher step (Meng et al.
    # 2023, stage one; ddpm.training.distill), before the halvings
    match_round: bool = False
    spacing: Literal["trailing"] = "trailing"
    parametrisation: Literal["v"] = "v"

    def __post_init__(self):
        if isinstance(self.teacher_guidance_interval, list):
            self.teacher_guidance_interval = tuple(self.teacher_guidance_interval)
        _check_fields(self)
        _require(1 <= self.steps < self.teacher_steps, f"distill.steps must lie in 1..teacher_steps - 1, got {self.steps}")
        _require(self.iters_per_round >= 1, f"distill.iters_per_round must be >= 1, got {self.iters_per_round}")


@dataclass
class TrainConfig:
    """Everything a run needs; ``model`` is a ``UNetConfig`` or an ``MLPConfig``; ``distill`` is set
    for a distilled run only (None otherwise, and then left out of ``to_dict``)."""

    model: Any
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"
    distill: Optional[DistillConfig] = None

    def __post_init__(self):
        _check_fields(self)
        check_interval(self.sample.guidance_interval, self.diffusion.timesteps)  # the samplers' rule, where T is known
        problem = variance_channels_problem(self.model.learn_sigma, self.diffusion.variance, training=True)
        _require(problem is None, problem)
        _check_conditioning(self)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = {"type": model_type(self.model), **dataclasses.asdict(self.model)}
        if self.distill is None:  # the configs of runs that were not distilled stay as they were
            del out["distill"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")

    def override(self, **dotted: Any) -> "TrainConfig":
        """A copy with ``{"optim.lr": 1e-3, "train.steps": 10}``-style keys replaced (re-validated)."""
        d = self.to_dict()
        for key, value in dotted.items():
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise UserError(f"unknown config key {key!r}")
                node = node[p]
            if leaf not in node:
                raise UserError(f"unknown config key {key!r}")
            node[leaf] = value
        if "model.learn_sigma" in dotted and "model.out_channels" not in dotted and "out_channels" in d["model"]:
            d["model"]["out_channels"] = None  # re-derived: C, or 2C with learned variances
        return TrainConfig.from_dict(d)


def _check_conditioning(config: TrainConfig) -> None:
    """Guidance and class names need a class-conditional network (``model.num_classes`` = K): a run
    names its K classes or none, and an unconditional one has nothing to guide."""
    K, names = config.model.num_classes, config.data.class_names
    _require(K is not None or config.sample.guidance == 1.0,
             f"sample.guidance {config.sample.guidance} needs a class-conditional model (model.num_classes, "
             f"--classes); this one is unconditional")
    _require(K is None or names is None or len(names) == K,
             f"data.class_names has {len(names or ())} names but model.num_classes is {K}")


# ---------------------------------------------------------------------------------------------
# Model configs live with their networks (unet.py, mlp.py); they are looked up by a "type" tag.
# ---------------------------------------------------------------------------------------------

def model_type(model_config: Any) -> str:
    name = type(model_config).__name__
    if name == "UNetConfig":
        return "unet"
    if name == "MLPConfig":
        return "mlp"
    raise ValueError(f"model config must be a UNetConfig or MLPConfig, got {name}")


def _model_config_class(kind: str):
    if kind == "unet":

        return UNetConfig
    if kind == "mlp":

        return MLPConfig
    raise ValueError(f"model type {kind!r} not allowed; choose one of unet, mlp")


def build_model(model_config: Any):
    """The network a model config describes (``UNet`` or ``MLPDenoiser``)."""
    if model_type(model_config) == "unet":

        return UNet(model_config)

    return MLPDenoiser(model_config)


def _admits(hint, kind: type) -> bool:
    """Whether annotation ``hint`` (``int``, ``Optional[int]``, ``Union[...]``) accepts ``kind``."""
    return kind in (typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,))


def _build(cls, d: Any, path: str):
    """Build dataclass ``cls`` from a dict, refusing unknown keys by their dotted name."""
    if not isinstance(d, dict):
        raise UserError(f"config section {path.rstrip('.') or '<root>'} must be a table/object, got {type(d).__name__}")
    d = dict(d)
    if cls is TrainConfig:
        model = d.get("model")
        if not isinstance(model, dict):
            raise UserError("config needs a 'model' table with a 'type' of unet or mlp")
        model = dict(model)
        model_cls = _model_config_class(model.pop("type", "unet"))
        d["model"] = _build(model_cls, model, "model.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in d:
        if key not in fields:
            raise UserError(f"unknown config key {path + key!r}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        hint = hints.get(key)
        if typing.get_origin(hint) is Union and isinstance(value, dict):  # Optional[SomeConfig]
            hint = next((h for h in typing.get_args(hint) if dataclasses.is_dataclass(h)), hint)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, f"{path}{key}.")
        elif isinstance(value, list):
            value = tuple(value)  # JSON/TOML have no tuples
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, float) and _admits(hint, int) and not _admits(hint, float):
            # 8.0 is 8; 2.5 is refused rather than rounded (a float step count never meets the
            # loop's last-step test, so the run would end without its final checkpoint)
            if not value.is_integer():
                raise UserError(f"{path}{key} must be an integer, got {value}")
            value = int(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{path}{key} must be a finite number, got {value}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"config section {path.rstrip('.') or '<root>'}: {exc}") from None
    except ValueError as exc:
        if not path:
            raise
        raise ValueError(f"config section {path.rstrip('.')}: {exc}") from None


def merge_dicts(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if key == "model" and isinstance(value, dict) and value.get("type", out["model"].get("type")) != out["model"].get("type"):
            out[key] = value  # a different network: its fields replace the preset's entirely
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict:
    """Parse a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise UserError(f"{path}: reading YAML needs pyyaml (pip install pyyaml)") from None
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml, .yml or .json")
    except UserError:
        raise
    except Exception as exc:  # parse errors of any of the three formats
        raise UserError(f"{path}: cannot parse config: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: config must be a table/object at the top level")
    return data


def item_shape(config: TrainConfig) -> tuple[int, ...]:
    """One item's shape: (C, H, W) for an image model, (dim,) for a point model."""
    m = config.model
    if hasattr(m, "image_size"):
        return (m.in_channels, *m.hw)  # (C, H, W); hw is (S, S) for an int image_size
    return (m.dim,)


def sample_kwargs(config: TrainConfig) -> dict:
    """The run's prediction, variance and clipping, as every sampler takes them; a distilled run's
    grid spacing too."""
    d = config.diffusion
    kwargs = {"prediction": d.prediction, "variance": d.variance, "clip_denoised": d.clip_denoised}
    if config.distill is not None:
        kwargs["spacing"] = config.distill.spacing
    return kwargs

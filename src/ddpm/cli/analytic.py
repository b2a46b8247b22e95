"""``ddpm analytic``: estimate a run's analytic reverse variances (Analytic-DPM, Bao et al. 2022)
into RUN/analytic.json (``ddpm.core.analytic.analytic_variance``), which ``--variance analytic``
of ``ddpm sample`` and ``ddpm eval nll`` then reads."""

from __future__ import annotations

from pathlib import Path

from .common import data_spec, load_run
from .options import add_amp_arg, add_model_args, positive
from ..errors import UserError

EXAMPLES = """examples:
  ddpm analytic runs/mnist-20250101-120000 --num 1024
  ddpm sample runs/mnist-20250101-120000 --sampler ddpm --steps 25 --variance analytic --out x.png
  ddpm eval nll runs/mnist-20250101-120000 --variance analytic --timesteps 100
"""


def add_parser(subparsers, formatter_class) -> None:
    a = subparsers.add_parser("analytic", help="estimate a run's analytic reverse variances into RUN/analytic.json",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Analytic-DPM (Bao et al. 2022): estimate Gamma_t = E||eps_theta(x_t, t)||^2 / d "
                              "at every timestep on the run's training data and save it as RUN/analytic.json for these "
                              "weights; --variance analytic then samples and evaluates with the optimal reverse variance.")
    a.set_defaults(func=cmd_analytic)
    a.add_argument("run", help="run directory or ckpt-NNNNNNN folder")
    a.add_argument("--data", default=None, help="data source spec (default: the run's training data)")
    a.add_argument("--num", type=positive, default=256, help="training examples averaged (default: 256); "
                   "cost: T * num / batch-size network calls")
    a.add_argument("--batch-size", type=positive, default=128, help="examples per network batch")
    a.add_argument("--seed", type=int, default=0, help="seed of the examples drawn and their noise")
    add_amp_arg(a)
    add_model_args(a)


def cmd_analytic(args) -> int:
    """Estimate Gamma_t (Bao et al. 2022, Theorem 1) for a run's weights on its training data and
    save RUN/analytic.json, which ``ddpm.load`` attaches to those weights (``variance="analytic"``)."""
    import torch

    from ..core.analytic import analytic_variance
    from ..data.sources import open_source
    from ..io.checkpoint import CKPT_RE, write_analytic_variance
    from ..nets.wrappers import PredictionChannels

    run, device = load_run(args.run, args, "estimating")
    if not CKPT_RE.match(Path(run.path).parent.name):  # before minutes of network calls
        raise UserError(f"{args.run}: analytic variances are saved in a run directory (RUN/ckpt-NNNNNNN/); "
                        f"{run.path} is not in one")
    spec = data_spec(args, run)
    cfg = run.config.data
    # Gamma_t is an expectation over q(x0): the training data, on the scale the model was trained on.
    data = open_source(spec, image_size=cfg.image_size, channels=cfg.channels)
    if tuple(data.shape) != tuple(run.shape):
        raise UserError(f"data {spec!r} has items of shape {tuple(data.shape)}, the model takes {tuple(run.shape)}")
    # Gamma_t replaces the network's own variances: a learned-variance network's channels are dropped.
    analytic = analytic_variance(PredictionChannels(run.model) if run.config.model.learn_sigma else run.model, run.schedule, data,
                                 num=args.num, batch_size=args.batch_size, prediction=run.sample_kwargs["prediction"],
                                 data_range=None if spec.startswith("toy:") else (-1.0, 1.0),
                                 generator=torch.Generator().manual_seed(args.seed), device=device,
                                 progress=args.progress, amp=run.amp)
    path = write_analytic_variance(run.path, analytic)
    print(f"ddpm: wrote {path}: Gamma_t at all {analytic.num_timesteps} timesteps for {run.path}, from "
          f"{analytic.num_examples} examples of {spec}; use it with --variance analytic (ddpm sample, ddpm eval nll)")
    return 0

"""Training a run and distilling one.

Where things are:

- ``loop``: ``train``, Algorithm 1 of Ho et al. 2020 with EMA, warm-up, clipping, a time budget,
  bit-exact resume and DDP (``distributed``: torchrun's side).
- ``optim``: the optimizer, its loss scaler and the EMA; ``budget``: the learning-rate schedule
  and the wall-clock budget; ``timestep_sampling``: loss-aware timestep importance sampling.
- ``data``: the data a run trains on, checked against its config; ``previews``: sample grids
  during training; ``runlog``: log.jsonl, TensorBoard and the progress bar; ``guards``: signals,
  exhausted memory or disk.
- ``distill``: progressive distillation (Salimans & Ho 2022) as functions; ``distill_run``: the
  same as a run directory (``ddpm distill``).
"""

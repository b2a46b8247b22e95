"""The mathematics of a DDPM, with no network and no files: the bottom layer above ``ddpm.errors``.

Where things are:

- ``schedules``: the seed's ``make_beta_schedule`` (linear, cosine, sqrt_linear, sqrt) and
  ``NoiseSchedule``, every term derived from the betas in float64 (alphas, abar, posterior
  variances, SNR).
- ``diffusion``: the forward process q(x_t | x_0) in closed form, its posterior, conversions
  between eps, x0 and v, and the training objective (Algorithm 1's loss, the hybrid VLB).
- ``nll``: the variational bound in bits/dim (eq. 5); ``analytic``: Analytic-DPM's variances.
- ``noise``: counter-based per-sample Gaussian noise (an image depends on its seed alone).
- ``device``: devices and precision (``pick_device``, autocast modes); ``shapes``: image sizes.
- ``threads``: torch's CPU threads on a shared machine (quiet OpenMP waits, the load follower).
"""

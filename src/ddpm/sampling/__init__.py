"""Sampling from a trained network, and the steering built on it.

Where things are:

- ``samplers``: ``sample``, the one entry point: ancestral DDPM (Algorithm 2), DDIM, DPM-Solver++(2M).
- ``grids``: the timestep grids a sampler visits (uniform, leading, trailing, quad, logsnr).
- ``guidance``: classifier-free guidance and autoguidance, as networks that combine predictions.
- ``inpainting`` (RePaint), ``inversion`` (DDIM inversion), ``interpolation``.
- ``batches``: many samples from a loaded run, batch by batch, as ``ddpm sample`` draws them.
"""

"""Measuring a run: FID, NLL reports, toy metrics, pictures and the run report.

Where things are:

- ``fid``: FID, Inception Score and KID with the standard Inception network (torch-fidelity).
- ``evaluate``: FID against a reference set, toy-data metrics and their JSON reports.
- ``viz``: sample grids, scatter plots, denoising strips, the schedule plot.
- ``report``: ``RUN/report.html``, one self-contained page per run.
"""

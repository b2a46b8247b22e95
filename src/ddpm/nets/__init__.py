"""Networks: they predict from (x_t, t) and know nothing of schedules or samplers.

Where things are:

- ``unet`` / ``unet_config``: the U-Net of Ho et al. 2020 (Appendix B) and its typed config,
  ``UNET_PRESETS``; ``mlp``: the small denoiser for 2-D data.
- ``convert``: diffusers' ``UNet2DModel`` weights in the DDPM layout to ours.
- ``fast``: channels_last, ``torch.compile`` and CUDA-graph replay for a network.
- ``wrappers``: networks that show another network a different face.
"""

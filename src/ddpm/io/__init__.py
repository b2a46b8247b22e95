"""Files: run directories, checkpoints, loading a run back, diffusers in and out.

Where things are:

- ``files``: atomic writes (``atomic_write``, ``atomic_folder``), the run lock, checksums.
- ``checkpoint``: ``ckpt-NNNNNNN/`` folders with their SHA-256 manifest: save, verify, resume;
  ``state``: validation of a checkpoint's ``state.pt``.
- ``run``: ``load`` a run, checkpoint or weights file as a ``LoadedRun``; ``read_config``.
- ``diffusers``: read a ``DDPMPipeline`` (or ``UNet2DModel``) directory, write one.
"""

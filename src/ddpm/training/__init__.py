"""ddpm.training.loop."""

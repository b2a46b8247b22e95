"""ddpm.io."""

"""ddpm.nets."""

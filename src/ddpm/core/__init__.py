"""ddpm.core."""

"""ddpm.data.sources."""

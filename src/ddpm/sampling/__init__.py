"""ddpm.sampling."""

"""ddpm.evaluation."""

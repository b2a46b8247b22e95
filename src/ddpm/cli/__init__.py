"""ddpm.cli.main."""

"""Library code: networks, preconditioning, losses, datasets, samplers and exposure-bias methods."""

"""Evaluation: feature detectors, Frechet distance and its uncertainty, copy detection, Jacobian rank
and the exposure-bias measurements (eps norms along the sampling chain)."""

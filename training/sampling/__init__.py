"""Sampling: the sampler loop, the denoiser protocol, and the corrections that wrap a denoiser.

sampler.py owns the loop and the sigma schedules; denoisers.py says what a denoiser is; the
exposure-bias corrections (epsilon_scaling.py, time_shift.py) and the analytic optimal denoiser
are small parts that generation.compose puts together.
"""

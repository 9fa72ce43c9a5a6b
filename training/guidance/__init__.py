"""Discriminator guidance (Kim et al., ICML 2023): the ADM-encoder discriminator, its training, and
the guided denoiser used alone or around epsilon scaling (SEDM-G++)."""

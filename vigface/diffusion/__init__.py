"""Stage 2: identity- and pose-conditioned pixel diffusion (schedules, samplers, denoiser)."""

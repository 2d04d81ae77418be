"""Interoperability with other samplers: diffusers schedulers (diffusers.py) and k-diffusion sigma lists
(learnsteps.schedule.k_diffusion_sigmas)."""

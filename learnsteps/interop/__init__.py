"""Interoperability with other samplers: diffusers schedulers (diffusers.py), k-diffusion samplers
(k_diffusion.py), and the plain sigma lists of ComfyUI, A1111 and pipelines (export.py)."""
from ..schedule import CONSUMERS
from . import diffusers, k_diffusion

CONSUMERS.update(diffusers=diffusers.recipe, k_diffusion=k_diffusion.recipe)

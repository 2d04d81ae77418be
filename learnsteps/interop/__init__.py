"""Interoperability with other samplers: diffusers schedulers (diffusers.py), k-diffusion samplers
(k_diffusion.py), ComfyUI (comfyui/: its sigma convention, samplers and nodes), and the plain sigma lists of
ComfyUI, A1111 and pipelines (export.py)."""
from ..schedule import CONSUMERS
from . import comfyui, diffusers, k_diffusion

CONSUMERS.update(diffusers=diffusers.recipe, k_diffusion=k_diffusion.recipe, comfyui=comfyui.recipe)

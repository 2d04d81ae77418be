"""Interoperability with other samplers: diffusers schedulers (diffusers.py), k-diffusion samplers
(k_diffusion.py), and the plain sigma lists of ComfyUI, A1111 and pipelines (export.py)."""

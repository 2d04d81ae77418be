"""Teachers: frozen diffusion models behind the Denoiser interface."""
from .gmm import GaussianMixture, digits_data, gaussian, gmm_digits, toy_mixture
from .load import load_teacher

__all__ = ["GaussianMixture", "gmm_digits", "gaussian", "digits_data", "toy_mixture", "load_teacher"]


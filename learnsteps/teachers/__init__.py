"""Teachers: frozen diffusion models behind the Denoiser interface."""
from .gmm import GaussianMixture, digits_data, gaussian, gmm_digits, toy_mixture

__all__ = ["GaussianMixture", "gmm_digits", "gaussian", "digits_data", "toy_mixture", "make_teacher"]


def make_teacher(name: str, noise_schedule=None):
    """A teacher by name: the exact mixtures 'gmm_digits' (embedded default), 'toy_mixture' and 'gaussian'."""
    factories = {"gmm_digits": gmm_digits, "toy_mixture": toy_mixture, "gaussian": gaussian}
    if name not in factories:
        raise ValueError(f"unknown teacher {name!r}: expected one of {sorted(factories)}")
    return factories[name](noise_schedule=noise_schedule)

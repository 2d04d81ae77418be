"""learnsteps: make pretrained diffusion models sample fast.

The public API of the sampler core:

    import learnsteps
    teacher = learnsteps.teachers.gmm_digits()                       # exact, embedded default teacher
    grid = learnsteps.grids.make("logsnr", 10, teacher.noise_schedule)
    x = learnsteps.sample(teacher, x_T, grid, solver="unipc", order=3)
"""
from .core import grids, schedules
from .core.denoiser import ClassifierFreeGuidance, Denoiser, NetworkDenoiser
from .core.reference import reference_solve
from .core.sample import SOLVERS, Solution, nfe, sample, solve
from . import interop, teachers  # interop: the schedule file's consumers register themselves

__version__ = "0.1.0"
__all__ = ["sample", "solve", "nfe", "SOLVERS", "Solution", "grids", "schedules", "teachers", "interop", "reference_solve",
           "Denoiser", "NetworkDenoiser", "ClassifierFreeGuidance", "__version__"]

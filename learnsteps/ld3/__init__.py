"""LD3: learn a solver's time steps (and decoupled model-evaluation offsets) from teacher pairs.

config.py: the run's schema and the hand grids; grid.py, solver.py: what is learned (the grid parameterisation, the
coefficient table); module.py: the LightningModule; run.py: the run (pairs, starts, training, export); report.py:
the held-out comparison, plots and pictures."""
from .config import LD3Config
from .module import LD3
from .run import train_ld3

__all__ = ["LD3", "LD3Config", "train_ld3"]

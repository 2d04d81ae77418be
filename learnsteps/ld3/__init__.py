"""LD3: learn a solver's time steps (and decoupled model-evaluation offsets) from teacher pairs."""

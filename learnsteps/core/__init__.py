"""The sampler core: noise schedules, the denoiser interface, solvers, time grids and reference solutions."""

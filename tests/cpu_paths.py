"""Print the CPU kernel paths (ATEN_CPU_CAPABILITY values) torch can run here besides the native one.

`make test` runs the numerical core once more under each, because their kernels may round differently."""
import os
import subprocess
import sys

import torch

PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability())"
PATHS = ("default", "avx2", "avx512")  # each a superset of the one before

# The native path is the best this CPU has. torch takes any path it was built with, whether or not the CPU has its
# instructions (AVX-512 asked for on a CPU without it dies of SIGILL in the first kernel that uses it), so only the
# paths below the native one are run.
native = torch.backends.cpu.get_cpu_capability().lower()
below = PATHS[:PATHS.index(native)] if native in PATHS else ()
for cap in below:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    if probe.returncode == 0 and probe.stdout.strip().lower() == cap:  # a path torch ignores: no second run
        print(cap)

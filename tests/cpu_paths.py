"""Print the CPU kernel paths (ATEN_CPU_CAPABILITY values) torch can run here besides the native one.

`make test` runs the numerical core once more under each, because their kernels may round differently."""
import os
import subprocess
import sys

import torch

PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability())"

native = torch.backends.cpu.get_cpu_capability().lower()
for cap in ("default", "avx2", "avx512"):
    if cap == native:
        continue
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    got = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True).stdout.strip()
    if got.lower() == cap:  # a path the CPU lacks falls back to another: not worth a second run
        print(cap)

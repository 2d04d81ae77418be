import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

# No network for the tests, in this process and in the Python subprocesses they start (which inherit PYTHONPATH).
_GUARD = str(Path(__file__).resolve().parent / "netguard")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_GUARD, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, _GUARD)
import netguard  # noqa: E402,F401
import torch  # noqa: E402


def pytest_report_header(config):
    # `make test` runs the numerical core again under each CPU kernel path (ATEN_CPU_CAPABILITY): say which this is
    return f"torch {torch.__version__}, CPU kernel path {torch.backends.cpu.get_cpu_capability()}"

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

# No network for the tests, in this process and in the Python subprocesses they start (which inherit PYTHONPATH).
_GUARD = str(Path(__file__).resolve().parent / "netguard")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_GUARD, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, _GUARD)
import netguard  # noqa: E402,F401

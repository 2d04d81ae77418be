import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from learnsteps.config import ConfigError, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sub:
    kind: str = "vp_linear"


@dataclass
class Cfg:
    nfe: int = 6
    solver: str = "unipc"
    orders: list[int] = field(default_factory=lambda: [1, 2])
    sub: Sub = field(default_factory=Sub)


def test_defaults_files_and_overrides_merge_in_order(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("nfe: 8\nsub:\n  kind: edm\n")
    cfg = load_config(Cfg, [f], ["solver=heun", "orders=[3,4]"])
    assert cfg == Cfg(nfe=8, solver="heun", orders=[3, 4], sub=Sub("edm"))
    assert "solver: heun" in to_yaml(cfg)


@pytest.mark.parametrize("overrides, match", [
    (["nfee=4"], r"Key 'nfee' not in 'Cfg'. Did you mean: 'nfe'\?"),
    (["sub.knd=edm"], r"Key 'knd' not in 'Sub'.*sub.knd"),
    (["nfe=six"], r"Value 'six' of type 'str' could not be converted to Integer \(key: nfe\)"),
    (["nfe=6.5"], r"could not be converted to Integer"),
    (["orders=[a]"], r"could not be converted to Integer"),
    (["nfe"], r"not of the form key=value"),
    (["sub={kind: [edm}"], r"the value in 'sub=\{kind: \[edm\}' is not valid YAML"),
])
def test_bad_overrides_name_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Cfg, [], overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, [tmp_path / "missing.yaml"])
    f = tmp_path / "bad.yaml"
    f.write_text("nfe: 8\nsolvr: heun\n")
    with pytest.raises(ConfigError, match="Key 'solvr' not in 'Cfg'"):
        load_config(Cfg, [f])
    f.write_text("nfe: [8\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, [f])


def test_solver_benchmark_runs_end_to_end(tmp_path):
    """The benchmark script at tiny settings: its table, CSV and plot are written."""
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "solvers.py"), "nfe=[3,4]", "samples=8",
                          "grids=[logsnr,gits]", "gits_fine_steps=10", "overhead=false", f"out_dir={out}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = (out / "errors.csv").read_text().splitlines()
    assert rows[0] == "solver,grid,nfe,rmse" and len(rows) > 20
    assert (out / "errors.png").stat().st_size > 10_000
    assert "| UniPC-3 (bh1) | gits |" in (out / "errors.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "solvers.py"), "samplez=8"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Did you mean: 'samples'" in bad.stderr

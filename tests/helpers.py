"""Shared test fixtures: small exact teachers and the reference solution they are measured against."""
import lightning as L
import torch

from learnsteps.core.denoiser import Denoiser

F64 = torch.float64

# every deterministic solver of the core: (solver, order, options)
DETERMINISTIC = [
    ("euler", 1, {}), ("heun", 2, {}),
    *[(s, p, dict(method=m, variant=v)) for s in ("dpm_solver", "dpm_solver++") for p in (1, 2, 3)
      for m in ("multistep", "singlestep") for v in ("midpoint", "taylor")],
    *[("unipc", p, dict(variant=v, corrector=c)) for p in (1, 2, 3) for v in ("bh1", "bh2") for c in (True, False)],
    ("unipc", 2, dict(data=False)),
    *[("deis", p, dict(basis=b)) for p in (1, 2, 3, 4) for b in ("tab", "logrho", "rhoab")],
    *[("ipndm", p, {}) for p in (1, 2, 3, 4)],
    *[("er_sde", p, dict(noise_scale="ode")) for p in (1, 2, 3)],
]


def ident(case):
    solver, order, opts = case
    return f"{solver}-{order}-" + "-".join(f"{v}" for v in opts.values())


class CountingDenoiser(Denoiser):
    """Wraps a denoiser and records every forward call's times (to count NFE and check evaluation times)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.noise_schedule, self.prediction = inner, inner.noise_schedule, inner.prediction
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append(torch.as_tensor(t).detach().reshape(-1)[0].item())
        return self.inner(x, t, cond)


def noise(shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


class Linear(L.LightningModule):
    """Fits y = 2x with SGD at cfg.lr; its loss turns NaN at step `nan_at` (as a diverging run's would)."""

    LR_KEYS = {"lr": 0}

    def __init__(self, lr: float, nan_at: int = -1):
        super().__init__()
        self.cfg = type("Cfg", (), dict(lr=lr))()
        self.w, self.nan_at = torch.nn.Parameter(torch.zeros(1)), nan_at

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss = (self.w * x - 2 * x).pow(2).mean()
        return loss * torch.nan if self.global_step == self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.cfg.lr)


class ValidatedLinear(Linear):
    """Linear with a validation loss (`val/loss`, as LD3 and DSNO log it); at a learning rate above 1 / E[x^2] its
    SGD diverges (each step multiplies w - 2 by 1 - 2 lr E[x^2]), and so does its validation loss."""

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        self.log("val/loss", (self.w * x - 2 * x).pow(2).mean())


def reexpressed(teacher, prediction: str):
    """The exact `teacher` as a network whose output is `prediction` (epsilon, x0, v, edm or flow), wrapped back
    into a NetworkDenoiser: the same model, seen through another parameterization's conversions."""
    from learnsteps.core.denoiser import NetworkDenoiser

    s = teacher.noise_schedule

    class Net(torch.nn.Module):
        def forward(self, x, t):
            if prediction == "edm":  # called on x~ = x/alpha at sigma~
                t = s.t_of_sigma_tilde(t)
                return teacher.x0(x * s.alpha(t).reshape(-1, *[1] * (x.dim() - 1)), t)
            eps, x0 = teacher.eps(x, t), teacher.x0(x, t)
            shape = (-1,) + (1,) * (x.dim() - 1)
            alpha, sigma = s.alpha(t).reshape(shape), s.sigma(t).reshape(shape)
            return {"epsilon": eps, "x0": x0, "v": alpha * eps - sigma * x0, "flow": eps - x0}[prediction]

    return NetworkDenoiser(Net(), s, prediction)


def refused_by_train_py(argv: list[str], capsys) -> str:
    """train.py's own code path (learnsteps.cli.train_main), in this process: it must exit 2 with one "error: ..."
    on stderr, which is returned (a subprocess per bad-argument case costs seconds of CI each)."""
    from learnsteps.cli import train_main

    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err[-1500:]
    return err


def benchmark_module(name: str, monkeypatch):
    """benchmarks/<name>.py imported as a module (the scripts are not a package); registered in sys.modules for the
    test only, where its dataclasses look their module up."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module

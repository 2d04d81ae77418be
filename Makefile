# Two commands for a fresh machine: `make demo` (set up, run the main job on the embedded default teacher)
# and `make test` (set up, run the test suite). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch + torchvision pinned together: torch-fidelity imports torchvision, and a mismatched pair does not import.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo bench solvers clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The numerical core runs once more under each other CPU kernel path torch has (its kernels may round an ulp
# differently, and an end-point formula that only works when they round alike has broken a fresh machine).
CORE_TESTS := tests/test_schedules.py tests/test_grids.py tests/test_solvers.py tests/test_gmm_teacher.py \
	tests/test_diffusers_parity.py tests/test_interop.py tests/test_flow.py tests/test_tabulated.py

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider
	for cap in $$($(PY) tests/cpu_paths.py); do \
		echo "numerical core tests, ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap WANDB_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider $(CORE_TESTS) || exit 1; \
	done

# The demo: LD3, then the learned solver started from its schedule, for the shipped latent flow-matching DiT (a
# diffusers DiTPipeline) with UniPC-2 at NFE 3; the second run judges both on 2000 held-out teacher pairs against
# every hand grid (README; benchmarks/ld3.py part=demo runs these lines over seeds, kernel paths and threads).
DEMO := teacher=digits_latent_flow guidance=1.0 solver=unipc order=2 nfe=3 t_min=0.015 \
	'loss=l2+30*feature_contraction' 'baselines=[time_uniform,time_quadratic,logsnr,edm,shifted,gits]' \
	pairs.steps=20 pairs.directory=runs/demo/pairs
DEMO_LD3 := pairs.test=0
DEMO_SOLVER := learn=solver init_schedule=runs/demo/ld3/schedule.json rounds_theta=0 rounds_joint=6 pairs.test=2000

demo: setup
	WANDB_MODE=offline $(PY) train.py mode=ld3 $(DEMO) $(DEMO_LD3) run_dir=runs/demo/ld3
	WANDB_MODE=offline $(PY) train.py mode=ld3 $(DEMO) $(DEMO_SOLVER) run_dir=runs/demo/solver

solvers: setup
	$(PY) benchmarks/solvers.py nfe=[3,4,6,8,10,15] samples=128 overhead=false out_dir=runs/solvers-demo

bench: setup
	$(PY) benchmarks/solvers.py
	$(PY) benchmarks/trajectories.py
	$(PY) benchmarks/ld3.py

clean:
	rm -rf runs .pytest_cache

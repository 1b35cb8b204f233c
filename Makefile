# The two README commands: `make run` (set up, then the main job) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
STAMP  := $(VENV)/.installed
# 2-core machines: one thread per MPI rank.
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: run test test-serial test-mpi lint bench env models

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt tools/bootstrap.sh
	bash tools/bootstrap.sh

run: $(STAMP)
	$(VENV)/bin/neuroscale homogenize --cell centre_and_corner_fibres --n 64 \
	    --param volume_fraction=0.45 --physics mechanical --solver fem \
	    --state 0.02,-0.01,0.01 --json results/homogenize.json
	$(MPIEXEC) -n 2 $(PY) examples/fe2_thermal.py --output results/fe2_thermal

test: test-serial test-mpi

test-serial: $(STAMP)
	$(PY) -m pytest

test-mpi: $(STAMP)
	timeout 1800 $(MPIEXEC) -n 2 $(PY) -m pytest -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/fine_solvers.py
	$(MPIEXEC) -n 2 $(PY) benchmarks/fe2_speedup.py

# Reproduce the shipped SANO models from scratch (data generation + training, CPU: about
# 1.5 h thermal, 50 min mechanical on two cores; CUDA is used when present).
models: $(STAMP)
	$(VENV)/bin/neuroscale train --config examples/train/thermal.toml
	$(VENV)/bin/neuroscale train --config examples/train/mechanical.toml
	cp examples/train/models/thermal_sano.pt examples/train/models/mechanical_sano.pt \
	    neuroscale_coupling/models/

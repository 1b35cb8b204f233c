#!/usr/bin/env bash
# Create the project's Python 3.12 virtual environment in .venv and install the package
# with its FE (DOLFINx wheel) and development extras, pinned by constraints.txt.
# Idempotent: run by `make`.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
    local candidates=(python3.12)
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root=$(pyenv root 2>/dev/null || true)
        [ -n "$root" ] && candidates+=("$root"/versions/3.12*/bin/python3.12)
    fi
    candidates+=(/usr/local/bin/python3.12 /usr/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12)
    local c
    for c in "${candidates[@]}"; do
        if "$c" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
            command -v "$c" 2>/dev/null || echo "$c"
            return 0
        fi
    done
    return 1
}

if ! PY=$(find_python312); then
    echo "error: no working Python 3.12 found (tried python3.12 on PATH, pyenv versions," >&2
    echo "/usr/local/bin, /usr/bin). The DOLFINx wheel dolfinx-solver-real is built for" >&2
    echo "CPython 3.12: install it (e.g. 'pyenv install 3.12', or your distribution's" >&2
    echo "python3.12 and python3.12-venv packages) and run this again." >&2
    exit 1
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "creating .venv with $PY"
    rm -rf .venv
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# One install: the package, DOLFINx (wheel with PETSc/petsc4py, MPICH, mpi4py) and dev tools,
# at the exact releases of constraints.txt (pyproject.toml only declares ranges).
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[fem,dev]"
# dolfinx-external-operator (host interop) needs --no-deps: it requires a distribution named
# fenics-dolfinx, which the DOLFINx wheel does not declare. Its version is the one
# constraints.txt pins.
.venv/bin/python -m pip install --quiet -c constraints.txt --no-deps dolfinx-external-operator
# micro-manager-precice (the preCICE Micro Manager host) needs --no-deps too: it requires
# pyprecice, which builds against preCICE's C++ library; its tests run it on a stand-in
# precice module (tests/precice_stub). Its other requirements are in the dev extra.
.venv/bin/python -m pip install --quiet -c constraints.txt --no-deps micro-manager-precice
.venv/bin/python -c "import dolfinx_solver, dolfinx, torch, neuroscale_coupling; print('environment ready: neuroscale_coupling', neuroscale_coupling.__version__, '| DOLFINx', dolfinx.__version__, '| torch', torch.__version__)"
touch .venv/.installed

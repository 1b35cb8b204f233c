"""The installed environment: import order of petsc4py, and what importing the package loads.

Each check runs in a fresh interpreter (``sys.executable -c ...``), because what is being
tested is the state of a new process: which modules an import pulls in, and whether the
DOLFINx wheel's vendored petsc4py can find its MPI library. The pytest process itself has
already imported mpi4py.MPI (tests/conftest.py), which would hide both.

Under ``mpiexec -n 2`` every rank runs these tests; the child interpreters must not try to
join the parent's MPI job (an inherited ``PMI_FD`` makes the child's ``MPI_Init`` fail with
"PMI_Init returned -1"), so :func:`_run` strips the process-manager variables from their
environment and each child is a singleton MPI process.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT_S = 120

#: Prefixes of the environment variables by which an MPI process manager tells a process
#: that it is a rank of a job: MPICH's Hydra sets PMI_RANK, PMI_SIZE, PMI_FD, PMI_HOSTNAME,
#: MPI_LOCALNRANKS, MPI_LOCALRANKID and HYDI_CONTROL_FD (PMI_PORT, PMI_ID, HYDRA_* in other
#: modes); PMIx, Open MPI and PRRTE set PMIX_*, OMPI_*, PRTE_*. A child started from a
#: rank must see none of them.
_MPI_JOB_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPI_LOCAL", "OMPI_", "PRTE_")

#: A child prints this, followed by the reason, to ask the parent to skip the test.
_SKIP = "SKIP: "


def _child_environment() -> dict[str, str]:
    return {
        name: value for name, value in os.environ.items() if not name.startswith(_MPI_JOB_PREFIXES)
    }


def _run(*snippets: str) -> str:
    """Run the code ``snippets`` (each dedented, then joined) in a fresh interpreter
    outside any MPI job; return its stdout.

    Fails the test on a non-zero exit status (showing the child's output), and skips it
    when the child printed a line starting with :data:`_SKIP`.
    """
    code = "\n".join(textwrap.dedent(snippet) for snippet in snippets)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=_child_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"child exited with status {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}",
            pytrace=False,
        )
    for line in result.stdout.splitlines():
        if line.startswith(_SKIP):
            pytest.skip(line.removeprefix(_SKIP))
    return result.stdout


def _require_module(name: str) -> str:
    """Child code: skip (via :data:`_SKIP`) when ``name`` is not installed. It locates the
    module without importing it, so it loads no library."""
    return f"""
    import importlib.util, sys
    if importlib.util.find_spec({name!r}) is None:
        print({_SKIP!r} + {name!r} + " is not installed")
        sys.exit(0)
    """


_PETSC_WORLD_SIZE = """
from petsc4py import PETSc
print("COMM_WORLD size", PETSc.COMM_WORLD.getSize())
"""


def _assert_singleton_world(stdout: str) -> None:
    assert "COMM_WORLD size 1" in stdout.splitlines(), stdout


def test_petsc4py_imports_after_the_closure():
    """A host that imports the closure and then petsc4py itself gets a working PETSc.

    The DOLFINx wheel's petsc4py extension and libpetsc need libmpi.so.12, which the
    ``mpich`` wheel puts in ``<prefix>/lib``, a directory their RPATH does not name: the
    dynamic loader finds it only when a library of that soname is already loaded, as
    ``mpi4py.MPI`` does (by full path). The closure and host modules import mpi4py.MPI,
    so any order after them works; before them, the documented first import below.
    """
    stdout = _run(
        _require_module("petsc4py"), "import neuroscale_coupling.closure", _PETSC_WORLD_SIZE
    )
    _assert_singleton_world(stdout)


@pytest.mark.parametrize(
    ("module", "first_import"),
    [
        # The DOLFINx wheel's documented first import: it checks that petsc4py is its
        # own and imports mpi4py.MPI, which loads the mpich wheel's libmpi.so.12.
        ("dolfinx_solver", "import dolfinx_solver"),
        # What that amounts to, for environments without the wheel (conda-forge DOLFINx).
        ("mpi4py", "from mpi4py import MPI"),
    ],
    ids=["dolfinx_solver", "mpi4py.MPI"],
)
def test_petsc4py_imports_after_the_documented_first_import(module, first_import):
    stdout = _run(
        _require_module("petsc4py"), _require_module(module), first_import, _PETSC_WORLD_SIZE
    )
    _assert_singleton_world(stdout)


def _imported_of(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after running ``statement``."""
    stdout = _run(
        statement,
        f"""
        import json, sys
        print("IMPORTED " + json.dumps([m for m in {modules!r} if m in sys.modules]))
        """,
    )
    (line,) = [line for line in stdout.splitlines() if line.startswith("IMPORTED ")]
    return json.loads(line.removeprefix("IMPORTED "))


def test_package_import_is_light():
    """``import neuroscale_coupling`` pulls in none of the heavy or MPI-initialising
    modules: those are imported by the modules that need them."""
    heavy = ("torch", "dolfinx", "dolfinx_solver", "petsc4py", "mpi4py.MPI", "scipy.stats")
    assert _imported_of("import neuroscale_coupling", heavy) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_package_import_loads_no_mpi_library():
    """Nor does it load libmpi: loading the mpich wheel's library costs some 45 ms and
    installs UCX's SIGHUP handler in the process, which a package import must not do
    (the modules that work with MPI import mpi4py.MPI themselves)."""
    stdout = _run(
        """
        import neuroscale_coupling
        with open("/proc/self/maps") as maps:
            mapped = sorted({l.split()[-1] for l in maps if "/libmpi.so" in l})
        print("MAPPED", mapped)
        """
    )
    assert "MAPPED []" in stdout.splitlines(), stdout


def test_closure_import_is_light():
    """``neuroscale_coupling.closure`` (closure operators, their contract and the exact
    closure) does not need torch, DOLFINx or scipy.stats to be imported."""
    heavy = ("torch", "dolfinx", "scipy.stats")
    assert _imported_of("import neuroscale_coupling.closure", heavy) == []

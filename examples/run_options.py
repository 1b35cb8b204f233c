"""Command-line options shared by the FE² drivers (examples, benchmarks): which closure,
which model, the fallback tolerance, online enrichment, and the exact-micro reference run.

Importing this module imports no host: :func:`solve_and_compare` compares the runs with
the DOLFINx host's ``compare_runs`` (imported when first needed) unless the caller passes
its host's own ``compare`` (the PETSc finite-volume example does).
"""

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.cell.materials import Material, material_to_dict
from neuroscale_coupling.closure.contract import Closure
from neuroscale_coupling.closure.enrichment import EnrichmentOptions
from neuroscale_coupling.closure.exact import ExactClosure
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.fine.protocol import FineSolver
from neuroscale_coupling.models import shipped_model_path
from neuroscale_coupling.surrogate.model_file import Surrogate

__all__ = [
    "add_closure_arguments",
    "closure_settings",
    "make_closure",
    "reference_record",
    "solve_and_compare",
]


def add_closure_arguments(
    parser: argparse.ArgumentParser, *, physics: str, closure: str, reference: bool
) -> None:
    """--closure, --model, --std-rel, --domain-tol, --enrich, --reference (defaults as
    given)."""
    parser.add_argument(
        "--closure", choices=("surrogate", "exact"), default=closure,
        help="SANO with fine-solver fallback, or a fine solve at every point "
        "(default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--model", help=f"SANO model file (default: the shipped {physics} model)")
    parser.add_argument(
        "--std-rel", type=float, default=FallbackPolicy.std_rel,
        help="fallback when ‖std‖ > STD_REL · max(‖response‖, training RMS) (default "
        "%(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--domain-tol", type=float, default=FallbackPolicy.domain_tol,
        help="half-widths a state may lie outside the training box before it falls back "
        "(default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--enrich", action="store_true", help="online enrichment between steps")
    parser.add_argument(
        "--reference", action=argparse.BooleanOptionalAction, default=reference,
        help="with the surrogate closure, also run the exact-micro FE² and compare",
    )  # fmt: skip


def closure_settings(
    args: argparse.Namespace, physics: str, material: Any
) -> tuple[Surrogate | None, FallbackPolicy, EnrichmentOptions | None]:
    """The surrogate (None for --closure exact), fallback policy and enrichment options
    that the parsed ``args`` ask for; the model's phases must be ``material``'s."""
    policy = FallbackPolicy(std_rel=args.std_rel, domain_tol=args.domain_tol)
    enrichment = EnrichmentOptions() if args.enrich else None
    if args.closure == "exact":
        return None, policy, enrichment
    path = args.model or shipped_model_path(physics)
    surrogate = Surrogate.load(path)
    if material_to_dict(surrogate.material) != material_to_dict(material):
        raise SystemExit(
            f"the model {path} was trained for {material_to_dict(surrogate.material)}, not "
            f"{material_to_dict(material)}: train one with examples/train/{physics}.toml"
        )
    return surrogate, policy, enrichment


def make_closure(
    material: Material,
    solver: FineSolver,
    cells: np.ndarray,
    *,
    comm: MPI.Comm,
    surrogate: Surrogate | None = None,
    policy: FallbackPolicy | None = None,
    enrichment: EnrichmentOptions | None = None,
) -> Closure:
    """The exact-micro closure on ``cells`` (n_local, n, n), or the surrogate closure with
    fallback when ``surrogate`` is given (collective)."""
    if surrogate is None:
        return ExactClosure(material, solver, cells, comm=comm)
    from neuroscale_coupling.closure.surrogate_closure import SurrogateClosure

    return SurrogateClosure(
        surrogate, solver, cells, comm=comm, policy=policy, enrichment=enrichment
    )


def reference_record(
    summary: dict[str, Any], reference: dict[str, Any], comparison: dict[str, Any]
) -> dict[str, Any]:
    """The ``reference`` entry of a surrogate run's summary: the exact-micro run's time and
    Newton iterations, the speed-up, and the differences from ``compare_runs``."""

    def cost(run: dict[str, Any]) -> float:
        return run.get("seconds_setup", 0.0) + run["seconds_total"]

    return {
        "closure": "exact",
        "seconds_setup": reference.get("seconds_setup", 0.0),
        "seconds_total": reference["seconds_total"],
        "seconds_closure": reference["seconds_closure"],
        "newton_iterations": reference["newton_iterations"],
        "speedup": cost(reference) / cost(summary),
        **comparison,
    }


def solve_and_compare(
    comm: MPI.Comm,
    build: Callable[..., Any],
    run: Callable[..., tuple[dict[str, Any], list[Any]]],
    values: Sequence[float],
    args: argparse.Namespace,
    options: dict[str, Any],
    *,
    surrogate: Surrogate | None,
    policy: FallbackPolicy,
    enrichment: EnrichmentOptions | None,
    compare: Callable[[Any, list[Any], Any, list[Any]], dict[str, Any]] | None = None,
) -> tuple[Any, dict[str, Any], list[Any], dict[str, Any] | None]:
    """Build an example's FE² problem and drive it through ``values`` (collective).

    ``build(comm, **options, surrogate=, policy=, enrichment=)`` makes the problem (the
    exact-micro closure without ``surrogate``); ``run(problem, values, output, progress,
    meta)`` drives it and returns (summary, fields per step). With a surrogate and
    ``args.reference`` the exact-micro problem is built and driven too (output in
    ``args.output``/reference) and the summary gains its ``reference`` record. The time of
    building each problem (closure set-up: latents, family ratios, cell meshes) is its
    ``seconds_setup`` and counts in the speed-up. Returns (problem, summary, fields per
    step, the reference's summary or None). ``compare(problem, history, reference,
    ref_history)`` measures the differences of the two runs (default: the DOLFINx host's
    ``compare_runs``).
    """

    def timed_build(**kwargs: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        problem = build(comm, **options, **kwargs)
        return problem, comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)

    problem, setup = timed_build(surrogate=surrogate, policy=policy, enrichment=enrichment)
    summary, history = run(problem, values, args.output, not args.quiet, vars(args))
    summary["seconds_setup"] = setup
    if surrogate is None or not args.reference:
        return problem, summary, history, None
    reference, ref_setup = timed_build()
    ref_summary, ref_history = run(
        reference, values, str(Path(args.output) / "reference"), not args.quiet,
        {**vars(args), "closure": "exact"},
    )  # fmt: skip
    ref_summary["seconds_setup"] = ref_setup
    if compare is None:
        from neuroscale_coupling.hosts.dolfinx.comparison import compare_runs as compare
    summary["reference"] = reference_record(
        summary, ref_summary, compare(problem, history, reference, ref_history)
    )
    return problem, summary, history, ref_summary

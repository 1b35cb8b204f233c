"""A closure as the external function of ``dolfinx-external-operator`` (FEMExternalOperator).

For DOLFINx users who already write forms with ``FEMExternalOperator`` (package
``dolfinx-external-operator`` 0.11; with the ``dolfinx-solver-real`` wheel install it with
``pip install --no-deps``, since it asks for a distribution named ``fenics-dolfinx``). The
closure's answer becomes the operator's values and its tangent the
values of the operator's derivatives, which the package creates when the form is
differentiated (``ufl.derivative``) and evaluates through the same external function::

    layout = quadrature_layout(msh, 2)
    closure = ExactClosure(material, solver, cells_for(layout.coordinates), comm=msh.comm)
    q = thermal_flux_operator(closure, T, layout)          # or mechanical_stress_operator
    F = ufl.inner(q, ufl.grad(v)) * layout.measure - f * v * layout.measure
    J = ufl.derivative(F, T, ufl.TrialFunction(V))
    F_r, F_ops = replace_external_operators(F)
    J_r, J_ops = replace_external_operators(J)
    problem = NonlinearProblem(F_r, T, J=J_r, bcs=bcs, petsc_options_prefix="fe2_", ...)
    attach_to_nonlinear_problem(problem, bcs, F_ops, J_ops)
    ext = q.external_function
    ext.begin_step(k)                # every step: the closure's call order
    problem.solve()
    if ext.revise_step(): ...        # solve the step again
    ext.end_step()

What the package expects (checked on 0.11.0 with the DOLFINx 0.11 wheel):

* ``external_function(derivatives)`` returns a callable; the package calls it with the
  evaluated operands, one array per operand, each of shape (n_cells, n_q, *shape)
  (scalars: (n_cells, n_q)), where n_cells counts ALL cells of the rank, ghosts
  included (``evaluate_operands`` with its default entities), in local cell order.
* The callable returns the values flattened in the order (cell, point, component) of
  the operator's space ``V``: (n_cells, n_q, *value_shape) for ``derivatives`` all zero,
  and (n_cells, n_q, *value_shape, *operand_shape) for a first derivative with respect
  to one operand (row-major, i.e. ``[..., i, j] = ∂value_i/∂operand_j``). The package
  writes it contiguously into the operator's coefficient and scatters forward, so ghost
  rows are overwritten by their owners' values.
* ``derivatives`` is a tuple with one entry per operand (how often the operator is
  differentiated with respect to that operand); this module answers order 0 and order 1.

The closure's points are the quadrature points of the cells this rank OWNS, numbered
``k = c * n_q + q`` (owned cell ``c`` in local numbering, point ``q`` of the reference
rule :attr:`MacroQuadrature.points`) — the numbering of
:class:`neuroscale_coupling.hosts.dolfinx.problems.MacroQuadrature` too.
:attr:`MacroQuadrature.coordinates` gives their physical coordinates in that order, so
a closure can be built for them.

One closure call per iterate: the operator and its derivatives are evaluated through one
:class:`ClosureExternalFunction`, which keeps the last states and answer. A request at
the same states (bitwise, on every rank: the decision is allreduced, because the closure
is collective) reuses the answer; new states call the closure once. Call
:meth:`ClosureExternalFunction.begin_step` (it forwards to the closure and empties the
cache) at the start of each load step.

Choices:

* Thermal: the operand of the flux is ``∇T`` and, when the temperature is a field (the
  default), ``T`` as a SECOND OPERAND, in the order of the closure state (G1, G2, θ).
  ``ufl.derivative`` then yields two derivative operators: ∂Q/∂G (shape (2, 2),
  derivatives (1, 0)) acting on ∇δT and ∂Q/∂θ (shape (2,), derivatives (0, 1)) acting
  on δT — the full consistent linearisation with no second operator to wire by hand.
  With ``temperature=<float>`` the flux has the single operand ∇T and θ is that fixed
  value (no ∂Q/∂θ term); any other scalar UFL expression may be given as θ.
* Mechanical: the operand is the tensor-shear Voigt strain (ε11, ε22, ε12)
  (:func:`voigt_strain`) and the operator is the Voigt stress (Σ11, Σ22, Σ12) with
  derivative dΣ/dE (3, 3), E12 one variable, exactly the closure's tangent. The work
  pairing must count the shear twice, σ:ε(v) = σ11ε11 + σ22ε22 + 2σ12ε12: write it as
  ``ufl.inner(stress_tensor(sigma), ufl.sym(ufl.grad(v)))``.
"""

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401  (import order of the DOLFINx wheel)

# isort: split
import ufl

from neuroscale_coupling.closure.contract import Closure, ClosureResult
from neuroscale_coupling.hosts.dolfinx.problems import MacroQuadrature, voigt_strain
from neuroscale_coupling.log import get_logger

try:
    from dolfinx_external_operator import (
        FEMExternalOperator,
        evaluate_external_operators,
        evaluate_operands,
    )
    from dolfinx_external_operator.petsc import assemble_residual_with_callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dolfinx-external-operator is not installed: `pip install --no-deps "
        "dolfinx-external-operator==0.11.0` (--no-deps: it requires a distribution named "
        f"fenics-dolfinx, which the dolfinx-solver-real wheel does not declare) ({exc})"
    ) from exc

__all__ = [
    "ClosureExternalFunction",
    "attach_to_nonlinear_problem",
    "mechanical_stress_operator",
    "quadrature_coordinates",
    "quadrature_layout",
    "stress_tensor",
    "thermal_flux_operator",
    "update_external_operators",
]

log = get_logger(__name__)


def quadrature_layout(msh: Any, degree: int) -> MacroQuadrature:
    """The quadrature rule of ``degree`` on ``msh``, checked for the package's value
    layout (not collective)."""
    if isinstance(degree, bool) or not isinstance(degree, int | np.integer) or degree < 0:
        raise ValueError(f"quadrature degree={degree!r}: give an integer >= 0, e.g. 2")
    layout = MacroQuadrature(msh, int(degree))
    _check_contiguous(layout.space(()), layout)
    return layout


def quadrature_coordinates(msh: Any, degree: int) -> np.ndarray:
    """Coordinates (n_owned_cells * n_q, 2) of the closure's local points, owned cells
    in local order, then the points of a cell (not collective)."""
    return quadrature_layout(msh, degree).coordinates


def _check_contiguous(space: Any, layout: MacroQuadrature) -> None:
    """The package writes values contiguously: the dofs must run cell by cell, owned first."""
    dofs = space.dofmap.list
    if dofs.shape != (layout.n_cells, layout.n_q) or not np.array_equal(
        dofs.reshape(-1), np.arange(dofs.size, dtype=dofs.dtype)
    ):
        raise RuntimeError(
            "the quadrature space's dofs are not numbered cell by cell (dofmap "
            f"{dofs.shape}, expected identity of shape ({layout.n_cells}, {layout.n_q})): "
            "dolfinx-external-operator 0.11 assumes that layout; use a DOLFINx 0.11 build"
        )
    if space.dofmap.index_map.size_local != layout.n_local:
        raise RuntimeError(
            f"{space.dofmap.index_map.size_local} owned quadrature dofs, expected "
            f"{layout.n_local} (owned cells x points): owned cells must come first"
        )


class ClosureExternalFunction:
    """The ``external_function`` of a FEMExternalOperator, backed by a closure.

    closure: any :class:`~neuroscale_coupling.closure.contract.Closure` built for
    ``layout.n_local`` points (see :attr:`MacroQuadrature.coordinates`), on a
    communicator with the mesh's processes.
    operand_columns: for each operand of the operator, in order, the closure state
    columns it supplies, e.g. ``((0, 1), (2,))`` for (∇T, T) of a thermal state
    (G1, G2, θ). An operand with one column may be a scalar.
    fixed_states: state columns held at a constant, e.g. ``{2: 20.0}`` (θ fixed).
    Every state column must come from exactly one operand or fixed value.

    ``self(derivatives)`` returns the function the package calls (see the module
    docstring for shapes). Attributes: ``closure_calls`` (closure evaluations done),
    ``requests`` (operator evaluations answered).
    """

    def __init__(
        self,
        closure: Closure,
        layout: MacroQuadrature,
        *,
        operand_columns: Sequence[Sequence[int]],
        fixed_states: Mapping[int, float] | None = None,
    ) -> None:
        if not isinstance(closure, Closure):
            raise TypeError(f"closure must be a neuroscale_coupling Closure; got {closure!r}")
        if not isinstance(layout, MacroQuadrature):
            raise TypeError(f"layout must come from quadrature_layout(); got {layout!r}")
        if closure.n_local != layout.n_local:
            raise ValueError(
                f"the closure has {closure.n_local} local points but the quadrature layout "
                f"has {layout.n_local} (owned cells {layout.n_owned_cells} x {layout.n_q} "
                "points): build the closure for layout.coordinates"
            )
        if closure.comm.size != layout.msh.comm.size:
            raise ValueError(
                f"the closure's communicator has {closure.comm.size} ranks, the mesh's "
                f"{layout.msh.comm.size}: build the closure with comm=msh.comm"
            )
        d = closure.material.state_dim
        fixed = {int(k): float(v) for k, v in (fixed_states or {}).items()}
        columns = tuple(tuple(int(c) for c in cols) for cols in operand_columns)
        used = [c for cols in columns for c in cols] + list(fixed)
        if not columns or any(len(cols) == 0 for cols in columns) or sorted(used) != list(range(d)):
            raise ValueError(
                f"operand_columns={columns} and fixed_states={fixed} must cover the "
                f"{d} state columns {closure.material.state_names} exactly once"
            )
        self.closure = closure
        self.layout = layout
        self.operand_columns = columns
        self.fixed_states = fixed
        self.closure_calls = 0
        self.requests = 0
        self._states: np.ndarray | None = None
        self._result: ClosureResult | None = None

    # ---------------------------------------------------------------- steps and cache
    def begin_step(self, step: int) -> None:
        """Start a load step (collective): forwards to the closure, empties the cache."""
        self.clear_cache()
        self.closure.begin_step(step)

    def revise_step(self) -> bool:
        """After the step's Newton solve converged (collective): the closure's revision;
        True when the step must be solved again (the cache is emptied then)."""
        revised = self.closure.revise_step()
        if revised:
            self.clear_cache()
        return revised

    def end_step(self) -> Any:
        """Close the step (collective); returns the closure's StepStats."""
        return self.closure.end_step()

    def abort_step(self) -> None:
        """Close a failed step (collective), see :meth:`Closure.abort_step`."""
        self.clear_cache()
        self.closure.abort_step()

    def clear_cache(self) -> None:
        """Forget the last answer: the next request calls the closure."""
        self._states = None
        self._result = None

    # ---------------------------------------------------------------- evaluation
    def __call__(self, derivatives: tuple[int, ...]) -> Callable[..., np.ndarray]:
        """The function answering the operator differentiated ``derivatives`` times."""
        orders = tuple(int(o) for o in derivatives)
        if len(orders) != len(self.operand_columns) or min(orders, default=0) < 0:
            raise ValueError(
                f"derivatives={derivatives!r} does not match the {len(self.operand_columns)} "
                "operand(s) of this operator"
            )
        if sum(orders) > 1:
            raise NotImplementedError(
                f"derivatives={orders}: the closure gives the response and its first "
                "derivatives only; do not differentiate the form twice"
            )
        return partial(self._answer, orders)

    def evaluate(self, *operands: np.ndarray) -> ClosureResult:
        """The closure's answer at the owned points for these operand values (collective;
        reuses the last answer when the states are unchanged on every rank)."""
        states = self._states_from(operands)
        same = self._states is not None and np.array_equal(states, self._states)
        if not self.closure.comm.allreduce(bool(same), op=MPI.LAND):
            self._result = self.closure.evaluate(states)
            self._states = states
            self.closure_calls += 1
            log.debug("closure call %d at %d local points", self.closure_calls, states.shape[0])
        assert self._result is not None
        return self._result

    def _answer(self, orders: tuple[int, ...], *operands: np.ndarray) -> np.ndarray:
        result = self.evaluate(*operands)
        self.requests += 1
        n = self.layout.n_local
        if sum(orders) == 0:
            values = result.response
        else:
            cols = self.operand_columns[orders.index(1)]
            values = result.tangent[:, :, list(cols)]
            if len(cols) == 1 and np.ndim(operands[orders.index(1)]) == 2:
                values = values[:, :, 0]  # scalar operand: shape (n, r)
        out = np.zeros((self.layout.n_cells * self.layout.n_q, *values.shape[1:]))
        out[:n] = values  # ghost rows: overwritten by the owners' values (scatter_forward)
        return out.reshape(-1)

    def _states_from(self, operands: Sequence[np.ndarray]) -> np.ndarray:
        lay = self.layout
        if len(operands) != len(self.operand_columns):
            raise ValueError(
                f"got {len(operands)} operand arrays, this operator has {len(self.operand_columns)}"
            )
        n_own, n_q = lay.n_owned_cells, lay.n_q
        states = np.empty((lay.n_local, self.closure.material.state_dim))
        for i, (values, cols) in enumerate(zip(operands, self.operand_columns, strict=True)):
            a = np.asarray(values)
            if a.ndim < 2 or a.shape[0] != lay.n_cells or a.shape[1] != n_q:
                raise ValueError(
                    f"operand {i} was evaluated with shape {a.shape}; expected "
                    f"({lay.n_cells}, {n_q}, ...) = all cells of the rank (ghosts included) "
                    "x quadrature points: call evaluate_operands with its default entities "
                    "and integrate with layout.measure"
                )
            a = a[:n_own].reshape(n_own * n_q, -1)
            if a.shape[1] != len(cols):
                raise ValueError(
                    f"operand {i} has {a.shape[1]} components per point but supplies the "
                    f"state columns {cols}"
                )
            states[:, list(cols)] = a
        for col, value in self.fixed_states.items():
            states[:, col] = value
        return states


def _check_physics(closure: Closure, physics: str, builder: str) -> None:
    got = getattr(closure.material, "physics", None)
    if got != physics:
        raise TypeError(f"{builder} needs a {physics} closure; the closure's material is {got!r}")


def thermal_flux_operator(
    closure: Closure,
    T: Any,
    layout: MacroQuadrature,
    *,
    temperature: float | Any | None = None,
    name: str = "Q",
) -> Any:
    """FEMExternalOperator Q(∇T, θ) (value shape (2,)) answered by a thermal closure.

    T: the temperature Function. temperature: None (default) → θ = T, a second operand,
    so that J gets ∂Q/∂θ δT; a float → θ fixed at that value (single operand ∇T); a
    scalar UFL expression → that expression as the second operand.
    Use with ``ufl.inner(Q, ufl.grad(v)) * layout.measure``.
    """
    _check_physics(closure, "thermal", "thermal_flux_operator")
    if temperature is None or not isinstance(temperature, int | float | np.floating):
        theta = T if temperature is None else temperature
        if getattr(theta, "ufl_shape", None) != ():
            raise ValueError(
                f"temperature must be a scalar UFL expression or a float; got {theta!r}"
            )
        operands: tuple[Any, ...] = (ufl.grad(T), theta)
        ext = ClosureExternalFunction(closure, layout, operand_columns=((0, 1), (2,)))
    else:
        operands = (ufl.grad(T),)
        ext = ClosureExternalFunction(
            closure, layout, operand_columns=((0, 1),), fixed_states={2: float(temperature)}
        )
    return FEMExternalOperator(
        *operands, function_space=layout.space((2,)), external_function=ext, name=name
    )


def stress_tensor(sigma: Any) -> Any:
    """2×2 tensor of a Voigt stress (σ11, σ22, σ12): ``inner(stress_tensor(σ), sym(grad v))``
    = σ11ε11 + σ22ε22 + 2σ12ε12, the internal work that counts the shear twice."""
    return ufl.as_matrix([[sigma[0], sigma[2]], [sigma[2], sigma[1]]])


def mechanical_stress_operator(
    closure: Closure, u: Any, layout: MacroQuadrature, *, name: str = "Sigma"
) -> Any:
    """FEMExternalOperator Σ(ε(u)) in tensor-shear Voigt (value shape (3,)) answered by a
    mechanical closure; its derivative is the closure's dΣ/dE (3, 3).

    Use with ``ufl.inner(stress_tensor(Sigma), ufl.sym(ufl.grad(v))) * layout.measure``.
    """
    _check_physics(closure, "mechanical", "mechanical_stress_operator")
    ext = ClosureExternalFunction(closure, layout, operand_columns=((0, 1, 2),))
    return FEMExternalOperator(
        voigt_strain(u), function_space=layout.space((3,)), external_function=ext, name=name
    )


def update_external_operators(*operator_lists: Sequence[Any]) -> None:
    """Evaluate the operands once and all the operators in the lists, in order
    (collective: every rank must pass the same lists). With the operators of F and J
    from ``replace_external_operators``, the closure is called once."""
    operators = [op for ops in operator_lists for op in ops]
    if operators:
        evaluate_external_operators(operators, evaluate_operands(operators))


def attach_to_nonlinear_problem(
    problem: Any, bcs: Sequence[Any], *operator_lists: Sequence[Any]
) -> None:
    """Make the SNES of a ``dolfinx.fem.petsc.NonlinearProblem`` update the operators at
    every residual evaluation (then the Jacobian at that iterate reuses them).

    problem: built from the REPLACED forms (``replace_external_operators``) with the
    same ``bcs``; operator_lists: the operator lists of F and J.
    """
    callback = partial(
        assemble_residual_with_callback,
        problem.u,
        problem.F,
        problem.J,
        list(bcs),
        update_external_operators,
        list(operator_lists),
    )
    problem.solver.setFunction(callback, problem.b)

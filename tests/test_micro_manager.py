"""The preCICE Micro Manager micro models: loaded and stepped by micro-manager-precice 0.12
itself (its config parsing and schema validation, class loader, stateless instancing,
checkpointing, model switching, adaptivity) on a stand-in ``precice`` module
(tests/precice_stub, as the Micro Manager's own unit tests do); per-point answers equal
the batched surrogate closure with the same policy to 1e-12; a point outside the
training domain is switched to the fine model and comes back exact; the numpy decoder
equals the torch decoder; settings files and data names are checked. Serially and under
``mpiexec -n 2`` (the Micro Manager splits the points over the ranks; every rank checks
its own)."""

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import evaluate_step
from mpi4py import MPI

if importlib.util.find_spec("micro_manager") is None:
    pytest.skip("micro-manager-precice is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).with_name("precice_stub")))
import precice

if getattr(precice, "__version__", "") != "0.0.0+stand-in":
    pytest.skip("a real pyprecice was imported before the stand-in", allow_module_level=True)

import micro_manager
from micro_manager.micro_simulation import MicroSimulationInterface, load_backend_class
from surrogate_cases import tiny_surrogate

from neuroscale_coupling.cell.microstructure import circular_inclusion
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.hosts import micro_manager as nmm
from neuroscale_coupling.hosts.micro_manager import engine as mm_engine
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.model import SANO
from neuroscale_coupling.surrogate.numpy_decoder import ThermalNumpyDecoder

needs_fem = pytest.mark.skipif(
    importlib.util.find_spec("dolfinx_solver") is None, reason="the fine model needs DOLFINx"
)

PKG = "neuroscale_coupling.hosts.micro_manager"
SURROGATE, FINE, SWITCHING = f"{PKG}.surrogate_model", f"{PKG}.fine_model", f"{PKG}.switching"
NAMES = nmm.DataNames()
# the macro mesh: 12 points in [0, 1] x [0, 0.5]; three volume fractions
COORDS = np.array([[x, y] for x in np.linspace(0.05, 0.95, 6) for y in (0.1, 0.4)])
FRACTIONS = (0.15, 0.3, 0.45)
OUTSIDE = 0  # the vertex pushed out of the training domain in the second time window


def macro(name, ids, window, iteration):
    """The data the stand-in macro writes: G, θ, the volume fraction and the coordinates."""
    ids = np.asarray(ids, dtype=np.int64)
    if name == NAMES.temperature_gradient:
        g = 1.5 * np.stack([np.cos(ids + 0.7 * window), np.sin(2.0 * ids + window)], axis=1)
        g *= 1.0 - 0.1 * iteration
        if window == 1:
            g[ids == OUTSIDE] = [3.0, -0.5]  # |G1| = 3 > 2: outside [-2, 2]
        return g.reshape(-1, 2)
    if name == NAMES.temperature:
        return 0.5 + 0.4 * np.sin(ids + window)
    if name == "Volume-Fraction":
        return np.array([FRACTIONS[i % 3] for i in ids], dtype=float)
    if name == "Coordinates":
        return COORDS[ids].reshape(-1, 2)
    raise KeyError(name)


def states_of(ids, window, iteration):
    g = macro(NAMES.temperature_gradient, ids, window, iteration)
    return np.column_stack([g, macro(NAMES.temperature, ids, window, iteration)])


def graded_cells(coords):
    """cells.function of the coordinates: (N, 2) -> (N, 8, 8), fraction growing with x."""
    return np.stack([circular_inclusion(8, 0.1 + 0.4 * float(c[0])) for c in np.atleast_2d(coords)])


def mm_config(path, comm, *, files, stateless, switching=False, reads=("Volume-Fraction",)):
    """A Micro Manager 0.12 configuration in ``path``; returns its file name. With model
    switching the Micro Manager writes Model-Resolution itself: it adds the name to the
    write data (listing it too would write it twice)."""
    writes = list(NAMES.write)
    params = {
        "micro_dt": 0.1,
        "macro_domain_bounds": [0.0, 1.0, 0.0, 0.5],
        "decomposition": [comm.size, 1],
    }
    if switching:
        params["model_switching"] = True
        params["model_switching_settings"] = {"switching_function": SWITCHING}
    cfg = {
        "participant_name": "Micro-Manager",
        "precice_config_file_path": "precice-config.xml",
        "interfaces": [
            {
                "mesh_name": "Macro-Mesh",
                "read_data": [{"name": n} for n in (*NAMES.read, *reads)],
                "write_data": [{"name": n} for n in writes],
            }
        ],
        "micro_manager": {
            "micro_file_names": files,
            "micro_stateless_flags": stateless,
            "output_directory": str(path / "out"),
            "simulation_params": params,
        },
    }
    file = path / "micro-manager-config.json"
    file.write_text(json.dumps(cfg, indent=2))
    return file


def run_micro_manager(config_file, *, windows=2, iterations=2):
    """initialize() and solve() of micro_manager.MicroManagerCoupling on the stand-in
    preCICE; returns the scenario (written data, call log) and the manager."""
    scenario = precice.Scenario(
        coords=COORDS,
        macro=macro,
        windows=windows,
        iterations=iterations,
        dims={NAMES.temperature_gradient: 2, NAMES.flux: 2, NAMES.flux_std: 2, "Coordinates": 2},
    )
    precice.Participant.scenario = scenario
    manager = micro_manager.MicroManagerCoupling(str(config_file))
    manager.initialize()
    manager.solve()
    return scenario, manager


def written(scenario, window, iteration):
    """This rank's written data of one solve: ids (n,), name -> (n, …)."""
    rows = [w for w in scenario.written if (w["window"], w["iteration"]) == (window, iteration)]
    ids = rows[0]["ids"]
    for w in rows:
        np.testing.assert_array_equal(w["ids"], ids)
    return ids, {w["name"]: w["data"] for w in rows}


def closure_reference(sur, ids, window, iteration, policy):
    """The batched answer: SurrogateClosure (float64, same policy) over this rank's points."""
    from neuroscale_coupling.closure.surrogate_closure import SurrogateClosure
    from neuroscale_coupling.fine.fem import FESolver

    cells = np.stack([circular_inclusion(8, FRACTIONS[i % 3]) for i in ids])
    closure = SurrogateClosure(
        sur, FESolver(sur.material), cells, comm=MPI.COMM_SELF, policy=policy
    )
    result = evaluate_step(closure, states_of(ids, window, iteration))
    return result, closure.reason


def assert_answers_equal(data, result):
    """The written data equal a ClosureResult to 1e-12."""
    tol = {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(data[NAMES.flux], result.response, **tol)
    k = np.column_stack([data[n] for n in NAMES.conductivity]).reshape(-1, 2, 2)
    np.testing.assert_allclose(k, result.tangent[:, :, :2], **tol)
    dth = np.column_stack([data[n] for n in NAMES.flux_temperature_derivative])
    np.testing.assert_allclose(dth, result.tangent[:, :, 2], **tol)
    np.testing.assert_allclose(data[NAMES.flux_std], result.std, **tol)
    np.testing.assert_array_equal(data[NAMES.exact], result.exact.astype(float))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float64 Surrogate, model file) of the tiny 8x8 thermal model (trained on COMM_SELF:
    bitwise the same on every rank)."""
    folder = tmp_path_factory.mktemp("mm")
    sur, _ = tiny_surrogate(folder)
    return sur.to(dtype=torch.float64), folder / f"tiny_{MPI.COMM_WORLD.rank}.pt"


@pytest.fixture(scope="module")
def policy(tiny):
    """The domain test, and an uncertainty threshold that sends about a third of the
    in-domain points of the scenario to the fine solver (family test off)."""
    sur, _ = tiny
    ids = np.arange(len(COORDS))
    images = np.stack([circular_inclusion(8, FRACTIONS[i % 3]) for i in ids])
    rel = []
    for w in range(2):
        for it in range(2):
            p = sur.predict(images, states_of(ids, w, it))
            size = np.maximum(
                np.linalg.norm(p.response, axis=1), np.linalg.norm(sur.response_scale)
            )
            rel.append(np.linalg.norm(p.std, axis=1) / size)
    return FallbackPolicy(
        std_rel=float(np.quantile(np.concatenate(rel), 0.7)), family_threshold=math.inf
    )


@pytest.fixture(autouse=True)
def _fresh_settings():
    yield
    nmm.configure(None)


def _settings(tiny, policy, **changes):
    _, path = tiny
    return nmm.MicroSettings(model=str(path), policy=policy, **changes)


# ---------------------------------------------------------------------------- loading
def test_the_micro_manager_loads_our_classes_as_its_own():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the wrapper for foreign classes
        classes = [load_backend_class(m) for m in (SURROGATE, FINE)]
    assert classes == [nmm.SurrogateMicroSimulation, nmm.FineMicroSimulation]
    for cls in classes:
        assert issubclass(cls, MicroSimulationInterface)
        # neither initialize nor output: the Micro Manager calls neither
        assert cls.initialize is MicroSimulationInterface.initialize
        assert cls.output is MicroSimulationInterface.output
    from neuroscale_coupling.hosts.micro_manager.switching import switching_function

    assert importlib.import_module(SWITCHING).switching_function is switching_function


def test_classes_built_before_the_micro_manager_are_adopted():
    """A model class on the stand-in interface (its module imported before the Micro
    Manager) is adopted by micro_manager_class, and even unadopted the Micro Manager's
    wrapper of foreign classes accepts it (no initialize(*args, **kwargs) to rewrite)."""
    from micro_manager.micro_simulation import _wrap_non_interface_class

    from neuroscale_coupling.hosts.micro_manager import simulations

    class Early(simulations._StandInInterface):
        def __init__(self, sim_id):
            self.gid = sim_id

        def solve(self, micro_sim_input, dt):
            return {"X": 1.0}

        def get_state(self):
            return None

        def set_state(self, state):
            pass

        def get_global_id(self):
            return self.gid

        def set_global_id(self, global_id):
            self.gid = global_id

    adopted = simulations.micro_manager_class(Early)
    assert issubclass(adopted, MicroSimulationInterface) and adopted is not Early
    sim = adopted(3)
    assert (sim.requires_initialize(), sim.requires_output(), sim.solve({}, 0.1)) == (
        False, False, {"X": 1.0},
    )  # fmt: skip
    assert (
        simulations.micro_manager_class(nmm.SurrogateMicroSimulation)
        is nmm.SurrogateMicroSimulation
    )
    with pytest.warns(DeprecationWarning):
        wrapped = _wrap_non_interface_class(Early, "early")
    assert not wrapped(2).requires_initialize() and wrapped(2).solve({}, 0.1) == {"X": 1.0}


# ---------------------------------------------------------------------------- runs
@needs_fem
def test_surrogate_model_answers_equal_the_batched_closure(tiny, policy, tmp_path, comm):
    """Stateless surrogate, fine solves where a test fires, no model switching: two time
    windows of two implicit iterations each (checkpoints written and read)."""
    sur, _ = tiny
    nmm.configure(_settings(tiny, policy))
    cfg = mm_config(tmp_path, comm, files=[SURROGATE], stateless=[True])
    scenario, manager = run_micro_manager(cfg)
    assert scenario.calls == ["construct", "initialize", "finalize"]
    # one shared instance (the stateless model's backend) behind every point
    backends = {
        id(manager._sim_container[lid]._backend) for lid in manager._sim_container.range_lid
    }
    assert len(backends) == 1
    n_exact = 0
    for window in range(2):
        for iteration in range(2):
            ids, data = written(scenario, window, iteration)
            assert ids.size == len(COORDS) // comm.size
            result, reason = closure_reference(sur, ids, window, iteration, policy)
            assert_answers_equal(data, result)
            n_exact += int(result.exact.sum())
            if window == 1 and OUTSIDE in ids:
                here = int(np.flatnonzero(ids == OUTSIDE)[0])
                assert reason[here] == 1  # the domain test
                assert data[NAMES.exact][here] == 1.0
    assert comm.allreduce(n_exact) > 2  # the domain and the uncertainty test both fired
    counts = mm_engine.shared().counts
    assert counts["cells"] == len(FRACTIONS)  # each distinct cell encoded once


@needs_fem
def test_model_switching_sends_the_failing_points_to_the_fine_model(tiny, policy, tmp_path, comm):
    """[fine, surrogate] with model switching: the switching function moves exactly the
    points the closure would hand to its fine solver; the answers equal the closure's."""
    sur, _ = tiny
    nmm.configure(_settings(tiny, policy, fine_solve=False))
    cfg = mm_config(tmp_path, comm, files=[FINE, SURROGATE], stateless=[True, True], switching=True)
    scenario, _ = run_micro_manager(cfg)
    fine_points = 0
    for window in range(2):
        for iteration in range(2):
            ids, data = written(scenario, window, iteration)
            result, reason = closure_reference(sur, ids, window, iteration, policy)
            assert_answers_equal(data, result)
            np.testing.assert_array_equal(data["Model-Resolution"], np.where(reason > 0, 0.0, 1.0))
            fine_points += int((reason > 0).sum())
            if window == 1 and OUTSIDE in ids:
                here = int(np.flatnonzero(ids == OUTSIDE)[0])
                assert data["Model-Resolution"][here] == 0.0
                assert data[NAMES.exact][here] == 1.0
                assert np.all(data[NAMES.flux_std][here] == 0.0)
    counts = mm_engine.shared().counts
    assert counts["fine"] == fine_points  # a fine solve only where it is needed
    assert counts["memo_hits"] > 0  # the switching function's predictions reused


@needs_fem
def test_adaptivity_keeps_one_active_point_per_cell(tiny, tmp_path, comm):
    """The Micro Manager's local adaptivity on the stateless surrogate, similarity by the
    cell's datum: one active point per distinct cell on each rank, whose answers equal the
    closure's; every inactive point gets the answer of an active point of its cell."""
    sur, _ = tiny
    domain_only = FallbackPolicy(std_rel=math.inf, family_threshold=math.inf)
    nmm.configure(_settings(tiny, domain_only))
    cfg = mm_config(tmp_path, comm, files=[SURROGATE], stateless=[True])
    data = json.loads(cfg.read_text())
    data["micro_manager"]["simulation_params"] |= {
        "adaptivity": True,
        "adaptivity_settings": {
            "type": "local", "data": ["Volume-Fraction"], "history_param": 0.5,
            "coarsening_constant": 0.3, "refining_constant": 0.05,
        },
    }  # fmt: skip
    cfg.write_text(json.dumps(data))
    scenario, _ = run_micro_manager(cfg)
    ids, out = written(scenario, 1, 1)
    active = out["Active-State"] == 1  # written by the Micro Manager itself
    fraction = np.array([FRACTIONS[i % 3] for i in ids])
    assert sorted(fraction[active]) == sorted(set(fraction))
    result, _ = closure_reference(sur, ids, 1, 1, domain_only)
    np.testing.assert_allclose(out[NAMES.flux][active], result.response[active], rtol=1e-12)
    for j in np.flatnonzero(~active):
        (k,) = np.flatnonzero(active & (fraction == fraction[j]))
        for name in NAMES.write:
            np.testing.assert_array_equal(out[name][j], out[name][k])


@needs_fem
def test_cells_from_the_coordinates(tiny, tmp_path, comm):
    """cells.function: a callable, then an import path, read the Coordinates datum."""
    sur, _ = tiny
    off = FallbackPolicy(std_rel=math.inf, domain_tol=math.inf, family_threshold=math.inf)
    ids = np.arange(len(COORDS))
    reference = sur.predict(graded_cells(COORDS), states_of(ids, 0, 0))
    for function in (graded_cells, "test_micro_manager:graded_cells"):
        cells = nmm.CellSpec(function=function)
        assert cells.data == "Coordinates"
        nmm.configure(_settings(tiny, off, cells=cells))
        cfg = mm_config(tmp_path, comm, files=[SURROGATE], stateless=[True], reads=("Coordinates",))
        scenario, _ = run_micro_manager(cfg, windows=1, iterations=1)
        local, data = written(scenario, 0, 0)
        np.testing.assert_allclose(
            data[NAMES.flux], reference.response[local], rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            data[NAMES.flux_std], reference.std[local], rtol=1e-12, atol=1e-12
        )


@needs_fem
def test_the_example_case_folder():
    """examples/micro_manager: the Micro Manager parses its configuration, the settings
    load, and the sample points go where they should (the outside one to the fine model)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "micro_manager" / "check_config.py"
    spec = importlib.util.spec_from_file_location("mm_check_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.check_configuration(path.with_name("micro-manager-config.json")).startswith(
        "parsed by the Micro Manager"
    )
    answers = module.main([])
    assert [a[NAMES.exact] for a in answers] == [0.0, 0.0, 1.0]
    assert np.all(answers[2][NAMES.flux_std] == 0.0) and np.all(answers[0][NAMES.flux_std] > 0)


# ---------------------------------------------------------------------------- decoder
def _decoder_cases():
    base = {"image_size": 8, "levels": 2, "tokens_side": 2, "d_model": 8, "heads": 2,
            "layers": 1, "latent": 6, "hidden": 12, "samples": 5}  # fmt: skip
    yield "odd, both terms", {**base, "linear_term": True, "quartic_term": True}
    yield "shift, 3 layers", {**base, "zero_mode": "shift", "decoder_layers": 3}
    yield "no dropout, 1 layer", {**base, "dropout": 0.0, "decoder_layers": 1, "linear_term": True}


@pytest.mark.parametrize(
    "config", [c for _, c in _decoder_cases()], ids=[n for n, _ in _decoder_cases()]
)
def test_numpy_decoder_equals_the_torch_decoder(config):
    torch.manual_seed(0)
    model = SANO(SANOConfig(**config)).double().eval()
    with torch.no_grad():  # a calibration and a family that make every std term count
        model.set_scaling(state_scale=2.0, theta_ref=0.5, theta_scale=0.5, response_scale=3.0)
        model.set_std_scale(1.7)
        model.set_std_floor([0.02, 0.03])
        model.family_scale.fill_(0.5)
        model.class_std_factor.copy_(torch.tensor([[1.0, 1.1], [1.2, 1.3], [0.9, 0.8], [1.0, 1.4]]))
    dec = ThermalNumpyDecoder(model)
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(3, config["latent"]))
    family = np.array([0.3, 1.4, 2.0])
    symmetry = np.array([1, 2, 8])
    states = np.column_stack([rng.uniform(-6, 6, (40, 2)), rng.uniform(-1, 2, 40)])
    rows = rng.integers(0, 3, 40)
    with torch.no_grad():
        ref = model.decode(
            torch.as_tensor(latents), torch.as_tensor(states), cells=torch.as_tensor(rows),
            family=torch.as_tensor(family), symmetry=symmetry,
        )  # fmt: skip
    cells = [dec.cell(latents[i], family[i], symmetry[i]) for i in range(3)]
    got = [dec.decode(cells[r], *s) for r, s in zip(rows, states.tolist(), strict=True)]
    for k, name in enumerate(("response", "tangent", "std")):
        want = getattr(ref, name).numpy()
        np.testing.assert_allclose(np.stack([g[k] for g in got]), want, rtol=1e-12, atol=1e-12)


def test_per_point_answers_of_the_shipped_model_equal_predict():
    """The realistic model (32x32 cells, polynomial terms, family statistics): the
    surrogate model's per-point solve equals Surrogate.predict (float64) to 1e-12."""
    from neuroscale_coupling.models import shipped_model_path
    from neuroscale_coupling.surrogate.model_file import Surrogate

    off = FallbackPolicy(std_rel=math.inf, domain_tol=math.inf, family_threshold=math.inf)
    nmm.configure(nmm.MicroSettings(policy=off))
    sim = nmm.SurrogateMicroSimulation(0)
    sur = Surrogate.load(shipped_model_path("thermal")).to(dtype=torch.float64)
    rng = np.random.default_rng(2)
    fractions = rng.choice([0.1, 0.25, 0.4, 0.6], 30)
    states = np.column_stack([rng.uniform(-2.5, 2.5, (30, 2)), rng.uniform(-0.2, 1.2, 30)])
    p = sur.predict(np.stack([circular_inclusion(32, f) for f in fractions]), states)
    for i in range(30):
        out = sim.solve({NAMES.temperature_gradient: states[i, :2], NAMES.temperature: states[i, 2],
                         "Volume-Fraction": fractions[i]}, 0.1)  # fmt: skip
        np.testing.assert_allclose(out[NAMES.flux], p.response[i], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out[NAMES.flux_std], p.std[i], rtol=1e-12, atol=1e-12)
        k = [out[n] for n in (*NAMES.conductivity, *NAMES.flux_temperature_derivative)]
        want = [*p.tangent[i, :, :2].reshape(-1), *p.tangent[i, :, 2]]
        np.testing.assert_allclose(k, want, rtol=1e-12, atol=1e-12)
        assert out[NAMES.exact] == 0.0


@pytest.mark.parametrize(
    "policy",
    [
        FallbackPolicy(),
        FallbackPolicy(std_rel=0.02, rel_floor=0.3, domain_tol=0.1, family_threshold=0.9),
        FallbackPolicy(std_abs=0.02, std_rel=math.inf),
    ],
    ids=["default", "tight", "absolute"],
)
def test_per_point_fallback_reasons_are_those_of_fallback_reasons(tiny, policy):
    """The engine's per-point decision equals closure.fallback.fallback_reasons on the same
    predictions, for states inside, near and outside the domain."""
    from neuroscale_coupling.closure.fallback import fallback_reasons

    sur, path = tiny
    engine = mm_engine.MicroEngine(nmm.MicroSettings(model=str(path), policy=policy))
    rng = np.random.default_rng(4)
    n = 200
    states = np.column_stack([rng.uniform(-2.4, 2.4, (n, 2)), rng.uniform(-0.2, 1.2, n)])
    fractions = rng.choice([0.05, 0.3, 0.6, 0.75], n)
    values, reasons, rows = [], [], []
    for s, f in zip(states, fractions, strict=True):
        row, *state = engine.point({NAMES.temperature_gradient: s[:2], NAMES.temperature: s[2],
                                    "Volume-Fraction": f})  # fmt: skip
        v, r = engine.predict(row, *state)
        values.append(v)
        reasons.append(r)
        rows.append(row)
    values = np.array(values)
    want = fallback_reasons(
        policy,
        domain_distance=sur.domain.distance_outside(states),
        family_ratio=np.array(engine.family_ratio)[rows],
        response=values[:, :2],
        std=values[:, 8:],
        response_rms=sur.response_scale,
    )
    np.testing.assert_array_equal(reasons, want)
    assert len(set(reasons)) > 1


# ---------------------------------------------------------------------------- settings
def test_settings_files(tmp_path, monkeypatch, comm):
    toml = tmp_path / "neuroscale-micro.toml"
    toml.write_text(
        'model = "models/m.pt"\ndecoder = "torch"\n[fallback]\nstd_rel = 0.1\n'
        'domain_tol = inf\nfine_solve = false\n[cells]\ngenerator = "laminate"\n'
        'data = "Porosity"\n[names]\nflux = "Heat-Flux"\n[fine]\ndegree = 2\n'
        "[switching]\nfine = 1\nsurrogate = 0\n"
    )
    monkeypatch.chdir(tmp_path)  # found next to the Micro Manager configuration
    monkeypatch.delenv(nmm.ENV_VAR, raising=False)
    s = nmm.load_settings()
    assert s.model == str(tmp_path / "models" / "m.pt") and s.decoder == "torch"
    assert s.policy == FallbackPolicy(std_rel=0.1, domain_tol=math.inf) and not s.fine_solve
    assert (s.cells.generator, s.cells.data, s.names.flux) == ("laminate", "Porosity", "Heat-Flux")
    assert s.fine == {"degree": 2} and (s.fine_index, s.surrogate_index) == (1, 0)
    # the Micro Manager's own configuration with a "neuroscale" object, named by the
    # environment variable: the Micro Manager's schema accepts the object
    cfg = mm_config(tmp_path, comm, files=[SURROGATE], stateless=[True])
    data = json.loads(cfg.read_text())
    data["neuroscale"] = {"model": "m.pt", "fallback": {"std_rel": "inf", "fine_solve": False}}
    cfg.write_text(json.dumps(data))
    config = micro_manager.Config(str(cfg))
    config.read_json_micro_manager()  # validates with precice-adapter-schema
    monkeypatch.setenv(nmm.ENV_VAR, str(cfg))
    s = nmm.load_settings()
    assert s.model == str(tmp_path / "m.pt") and s.policy.std_rel == math.inf
    monkeypatch.setenv(nmm.ENV_VAR, str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="NEUROSCALE_MICRO_CONFIG"):
        nmm.load_settings()


def test_bad_settings_are_refused_clearly():
    with pytest.raises(ValueError, match=r"'heat_flux'.*not a valid preCICE data name"):
        nmm.DataNames(flux="heat_flux")
    with pytest.raises(ValueError, match="more than one datum"):
        nmm.DataNames(flux="Temperature")
    with pytest.raises(ValueError, match=r"unknown settings keys \['modle'\]"):
        nmm.MicroSettings.from_dict({"modle": "x.pt"})
    with pytest.raises(ValueError, match=r"unknown fallback keys \['std'\]"):
        nmm.MicroSettings.from_dict({"fallback": {"std": 0.1}})
    with pytest.raises(ValueError, match=r"cells.generator='disk'"):
        nmm.CellSpec(generator="disk")
    with pytest.raises(ValueError, match=r"cells.data='volume fraction'"):
        nmm.CellSpec(data="volume fraction")
    with pytest.raises(ValueError, match="import path"):
        nmm.CellSpec(function="no_colon").source(8)
    with pytest.raises(TypeError, match="fine_solve must be true or false"):
        nmm.MicroSettings.from_dict({"fallback": {"fine_solve": "yes"}})


def test_missing_data_and_bad_states_name_the_fix(tiny):
    off = FallbackPolicy(std_rel=math.inf, domain_tol=math.inf, family_threshold=math.inf)
    nmm.configure(_settings(tiny, off))
    sim = nmm.SurrogateMicroSimulation(0)
    good = {NAMES.temperature_gradient: np.array([0.1, 0.2]), NAMES.temperature: 0.5,
            "Volume-Fraction": 0.3}  # fmt: skip
    assert sim.solve(good, 0.1)[NAMES.exact] == 0.0
    with pytest.raises(KeyError, match=r"Volume-Fraction.*add it to read_data"):
        sim.solve({k: v for k, v in good.items() if k != "Volume-Fraction"}, 0.1)
    with pytest.raises(KeyError, match=r"'Temperature'.*read_data"):
        sim.solve({k: v for k, v in good.items() if k != NAMES.temperature}, 0.1)
    with pytest.raises(ValueError, match=r"3 components.*2D macro mesh"):
        sim.solve({**good, NAMES.temperature_gradient: np.zeros(3)}, 0.1)
    with pytest.raises(ValueError, match="not finite"):
        sim.solve({**good, NAMES.temperature: float("nan")}, 0.1)

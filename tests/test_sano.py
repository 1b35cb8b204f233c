"""SANO surrogate architecture: shapes, encode/decode split, physics structure of the
decoders (convex potential, exact tangents, zero response at zero load), fixed MC-dropout
masks, per-scale attention and the D4 group average. Tiny models, random inputs."""

import numpy as np
import pytest
import pywt
import torch

from neuroscale_coupling.cell.symmetry import (
    D4,
    d4_average,
    response_matrix,
    response_orbits,
    state_matrix,
    transform_image,
)
from neuroscale_coupling.surrogate.calibration import LEVELS_P, gaussian_multipliers
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.model import SANO

N_IMG, LEVELS = 16, 2


def tiny(physics: str = "thermal", **kw) -> SANOConfig:
    base = dict(
        physics=physics,
        image_size=N_IMG,
        levels=LEVELS,
        tokens_side=4,
        d_model=16,
        heads=2,
        layers=2,
        pos_freqs=2,
        latent=8,
        hidden=16,
        decoder_layers=2,
        dropout=0.2,
        samples=6,
    )
    base.update(kw)
    return SANOConfig(**base)


def make(physics: str = "thermal", *, dtype=torch.float32, seed: int = 0, **kw) -> SANO:
    torch.manual_seed(seed)
    return SANO(tiny(physics, **kw)).to(dtype).eval()


def wavelet(images: np.ndarray, dtype=torch.float32) -> list[torch.Tensor]:
    out = pywt.wavedec2(images, "db2", mode="periodization", level=LEVELS, axes=(-2, -1))
    return [torch.tensor(out[0][:, None], dtype=dtype)] + [
        torch.tensor(np.stack(d, 1), dtype=dtype) for d in out[1:]
    ]


def images(b: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random((b, N_IMG, N_IMG)) > 0.6).astype(float)


def states(physics: str, n: int, seed: int = 2, dtype=torch.float32) -> torch.Tensor:
    s = torch.tensor(np.random.default_rng(seed).normal(size=(n, 3)), dtype=dtype)
    if physics == "thermal":
        s[:, 2] = 300.0 + 50.0 * s[:, 2]
    return s


def set_units(model: SANO, physics: str) -> None:
    if physics == "thermal":
        model.set_scaling(state_scale=2.0, theta_ref=300.0, theta_scale=50.0, response_scale=3.0)
    else:
        model.set_scaling(state_scale=0.5, response_scale=10.0)


def test_config_round_trip_and_errors():
    cfg = tiny("mechanical", zero_mode="shift")
    assert SANOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SANOConfig keys"):
        SANOConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="physics"):
        SANOConfig(physics="acoustic")
    with pytest.raises(ValueError, match="zero_mode"):
        SANOConfig(zero_mode="none")
    with pytest.raises(ValueError, match="d_model"):
        SANO(tiny(d_model=15))


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_shapes_and_encode_decode_split(physics):
    model = make(physics)
    c = wavelet(images(3))
    s = states(physics, 3)
    latent, mass = model.encode(c, return_attention=True)
    assert latent.shape == (3, 8)
    assert mass.shape == (3, 2, LEVELS + 1)
    full = model(c, s)
    split = model.decode(latent, s)
    r = 2 if physics == "thermal" else 3
    assert full.response.shape == (3, r)
    assert full.tangent.shape == (3, r, 3)
    assert full.std.shape == (3, r)
    for a, b in ((full.response, split.response), (full.tangent, split.tangent)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Cached latents: many states per cell through a cell index, and a single latent.
    cells = torch.tensor([2, 0, 0, 1, 2])
    s5 = states(physics, 5, seed=4)
    cached = model.decode(latent, s5, cells=cells)
    for i in range(5):  # float32: batched and single evaluations differ by round-off
        one = model.decode(latent[cells[i]][None], s5[i : i + 1])
        torch.testing.assert_close(cached.response[i], one.response[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached.tangent[i], one.tangent[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cells"):
        model.decode(latent, s5)
    with pytest.raises(ValueError, match="coefficient"):
        model.encode(c[:-1])


def test_scale_attention_sums_to_one():
    model = make()
    mass = model.scale_attention(wavelet(images(4)))
    assert mass.shape == (4, 2, LEVELS + 1)
    assert torch.all(mass >= 0)
    torch.testing.assert_close(mass.sum(-1), torch.ones(4, 2))


@pytest.mark.parametrize("zero_mode", ["odd", "shift"])
def test_thermal_potential_structure(zero_mode):
    model = make("thermal", dtype=torch.float64, zero_mode=zero_mode, seed=3)
    set_units(model, "thermal")
    latent = model.encode(wavelet(images(4), torch.float64))
    cells = torch.arange(40) % 4
    s = states("thermal", 40, dtype=torch.float64) * torch.tensor([3.0, 3.0, 1.0])
    out = model.decode(latent, s, cells=cells, return_samples=True)
    dqdg = out.tangent[:, :, :2]
    torch.testing.assert_close(dqdg, dqdg.transpose(1, 2), rtol=0, atol=1e-14)
    eig = torch.linalg.eigvalsh(dqdg)
    assert torch.all(eig > 0), eig.min()
    # Q(G = 0, θ) = 0 for every θ, every sample.
    s0 = s.clone()
    s0[:, :2] = 0
    z = model.decode(latent, s0, cells=cells, return_samples=True)
    assert z.samples.abs().max() < 1e-13
    assert z.response.abs().max() < 1e-13


@pytest.mark.parametrize(
    ("physics", "zero_mode"),
    [("thermal", "odd"), ("thermal", "shift"), ("mechanical", "odd"), ("mechanical", "shift")],
)
@pytest.mark.parametrize("options", [False, True])
def test_tangent_is_central_difference_of_mean_response(physics, zero_mode, options):
    model = make(
        physics,
        dtype=torch.float64,
        zero_mode=zero_mode,
        seed=5,
        linear_term=options,
        fraction_input=options,
        quartic_term=options and physics == "thermal",
    )
    set_units(model, physics)
    latent = model.encode(wavelet(images(2), torch.float64))
    cells = torch.tensor([0, 1, 1])
    s = states(physics, 3, dtype=torch.float64)
    out = model.decode(latent, s, cells=cells)
    # Relative step per component (θ ~ 300 needs a larger absolute step).
    h = 1e-6 * torch.maximum(s.abs().max(0).values, torch.ones(3, dtype=torch.float64))
    fd = torch.empty_like(out.tangent)
    for j in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = h[j]
        plus = model.decode(latent, s + e, cells=cells).response
        minus = model.decode(latent, s - e, cells=cells).response
        fd[:, :, j] = (plus - minus) / (2 * h[j])
    torch.testing.assert_close(out.tangent, fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("zero_mode", ["odd", "shift"])
def test_mechanical_zero_stress_at_zero_strain(zero_mode):
    model = make("mechanical", dtype=torch.float64, zero_mode=zero_mode)
    latent = model.encode(wavelet(images(3), torch.float64))
    out = model.decode(latent, torch.zeros(3, 3, dtype=torch.float64), return_samples=True)
    assert out.samples.abs().max() < 1e-14


def test_odd_mode_response_is_odd():
    for physics in ("thermal", "mechanical"):
        model = make(physics, dtype=torch.float64)
        latent = model.encode(wavelet(images(2), torch.float64))
        s = states(physics, 2, dtype=torch.float64)
        flip = torch.tensor([-1.0, -1.0, 1.0 if physics == "thermal" else -1.0])
        a = model.decode(latent, s).response
        b = model.decode(latent, s * flip.to(s)).response
        torch.testing.assert_close(a, -b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_fixed_masks_deterministic_and_spread(physics):
    model = make(physics)
    c = wavelet(images(2))
    s = states(physics, 2)
    a, b = model(c, s), model(c, s)
    for x, y in ((a.response, b.response), (a.tangent, b.tangent), (a.std, b.std)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert torch.all(a.std > 0)
    model.set_std_scale(2.5)
    torch.testing.assert_close(model(c, s).std, 2.5 * a.std)
    # Masks change only through reset_masks; the same seed restores them. They set the
    # spread; the mean is their exact expectation (unmasked output weights), which the
    # masks do not change.
    model.reset_masks(123)
    other = model(c, s)
    assert not torch.equal(other.std, a.std)
    torch.testing.assert_close(other.response, a.response, rtol=1e-6, atol=1e-7)
    model.reset_masks(0)
    torch.testing.assert_close(model(c, s).std, 2.5 * a.std)
    model.masks.enabled = False  # one all-ones mask: the unmasked network
    torch.testing.assert_close(model(c, s).response, a.response, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model(c, s).tangent, a.tangent, rtol=1e-6, atol=1e-7)
    # p = 0: no spread.
    plain = make(physics, dropout=0.0)
    assert torch.all(plain(c, s).std == 0)


def test_training_mode_gradients_and_kl():
    model = make("thermal").train()
    c = wavelet(images(2))
    s = states("thermal", 2)
    out = model(c, s, return_samples=True)
    assert out.samples.shape == (2, 6, 2)
    loss = out.response.square().mean() + out.tangent.square().mean() + model.kl()
    loss.backward()
    assert model.masks.p_logit.grad is not None
    assert torch.isfinite(model.masks.p_logit.grad)
    assert model.encoder.proj[0].weight.grad.abs().sum() > 0
    assert model.decoder.h_raw[0].grad.abs().sum() > 0  # through the Hessian (tangent)
    # The tangent alone backpropagates to the convex (non-negative) weights and the output.
    model.zero_grad()
    model(c, s).tangent[:, :, 2].square().sum().backward()
    assert model.decoder.h_raw[0].grad.abs().sum() > 0
    assert model.decoder.out_raw.grad.abs().sum() > 0
    assert torch.isfinite(make("mechanical", dropout=0.0).kl())


def test_state_dict_round_trip():
    model = make("mechanical")
    model.set_std_scale(1.7)
    model.set_std_floor([0.1, 0.2, 0.3])
    model.reset_masks(9)
    clone = SANO(SANOConfig.from_dict(model.config.to_dict())).eval()
    clone.load_state_dict(model.state_dict())
    c, s = wavelet(images(2)), states("mechanical", 2)
    torch.testing.assert_close(clone(c, s).std, model(c, s).std, rtol=0, atol=0)
    # calibrated std = √((scale · spread)² + floor²); raw_std gives the spread alone
    with model.raw_std():
        spread = model(c, s).std
    floor = torch.tensor([0.1, 0.2, 0.3])
    expected = torch.sqrt((1.7 * spread) ** 2 + floor**2)
    torch.testing.assert_close(model(c, s).std, expected.to(spread.dtype))
    assert float(model.std_scale) == pytest.approx(1.7) and float(
        model.std_floor[2]
    ) == pytest.approx(0.3)
    # with a cell error head the floor scales with τ(z) = exp(b + W z)
    gen = torch.Generator().manual_seed(4)
    w = 0.3 * torch.randn(3, model.config.latent, generator=gen)
    b = torch.tensor([-1.0, 0.0, 0.5])
    model.set_cell_error_head(w.numpy(), b.numpy())
    tau = torch.exp(b + model.encode(c) @ w.T)
    expected = torch.sqrt((1.7 * spread) ** 2 + (floor * tau) ** 2)
    torch.testing.assert_close(model(c, s).std, expected.to(spread.dtype), rtol=1e-5, atol=0)
    table = 1.5 * gaussian_multipliers(LEVELS_P)
    model.set_interval_multipliers(table)
    np.testing.assert_allclose(model.interval_multipliers(0.95), 1.5 * 1.959964, rtol=1e-6)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(c, s).std, model(c, s).std, rtol=0, atol=0)
    np.testing.assert_allclose(clone.interval_multipliers(0.5), model.interval_multipliers(0.5))
    with pytest.raises(ValueError, match="cell error head"):
        model.set_cell_error_head(w[:, :2].numpy(), b.numpy())
    # a file written before the head and the table existed: τ = 1, Gaussian intervals
    old = {
        k: v
        for k, v in model.state_dict().items()
        if k not in ("error_weight", "error_bias", "interval_table")
    }
    clone.load_state_dict(old)
    torch.testing.assert_close(clone(c, s).std, torch.sqrt((1.7 * spread) ** 2 + floor**2))
    np.testing.assert_allclose(clone.interval_multipliers(0.95), 1.959964, rtol=1e-6)


def test_symmetry_class_calibration():
    """Per symmetry class: the std is multiplied by the class's factor and the interval
    multipliers come from its row; without the orders the pooled calibration applies."""
    model = make("mechanical")
    model.set_std_scale(1.3)
    pooled = 1.2 * gaussian_multipliers(LEVELS_P)
    factor = np.array([2.0, 1.0, 1.0, 0.5])
    table = np.stack([pooled * f for f in (1.5, 1.0, 1.0, 0.8)])
    model.set_interval_multipliers(pooled, factor, table)
    c, s = wavelet(images(3)), states("mechanical", 5)
    latent = model.encode(c)
    cells = torch.tensor([0, 1, 2, 2, 0])
    order = np.array([1, 8, 4])
    base = model.decode(latent, s, cells=cells).std
    scaled = model.decode(latent, s, cells=cells, symmetry=order).std
    expected = base * torch.as_tensor(factor[[0, 3, 2]], dtype=base.dtype)[cells][:, None]
    torch.testing.assert_close(scaled, expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(model.class_factor(order), np.repeat(factor[[0, 3, 2], None], 3, 1))
    k = model.interval_multipliers((0.5, 0.95), order)
    assert k.shape == (2, 3)
    np.testing.assert_allclose(k[:, 0], 1.5 * model.interval_multipliers((0.5, 0.95)), rtol=1e-6)
    np.testing.assert_allclose(k[:, 1], 0.8 * model.interval_multipliers((0.5, 0.95)), rtol=1e-6)
    np.testing.assert_allclose(k[:, 2], model.interval_multipliers((0.5, 0.95)), rtol=1e-6)
    with model.raw_std():  # the raw spread ignores the classes
        raw = model.decode(latent, s, cells=cells, symmetry=order).std
    with model.raw_std():
        torch.testing.assert_close(raw, model.decode(latent, s, cells=cells).std)
    # the classes travel with the state dict; an older file gets the pooled calibration
    clone = make("mechanical", seed=1)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.decode(latent, s, cells=cells, symmetry=order).std, scaled)
    old = {
        k: v
        for k, v in model.state_dict().items()
        if k not in ("class_std_factor", "class_interval_table")
    }
    clone.load_state_dict(old)
    torch.testing.assert_close(clone.decode(latent, s, cells=cells, symmetry=order).std, base)
    np.testing.assert_allclose(
        clone.interval_multipliers(0.9, order), np.tile(model.interval_multipliers(0.9), (1, 3))
    )
    with pytest.raises(ValueError, match="symmetry orders"):
        model.decode(latent, s, cells=cells, symmetry=np.array([1, 3, 8]))
    with pytest.raises(ValueError, match="3 latent rows"):
        model.decode(latent, s, cells=cells, symmetry=np.array([1, 8]))
    with pytest.raises(ValueError, match="class factors"):
        model.set_interval_multipliers(pooled, factor[:3], table)
    # one factor per class and response component
    per_component = np.outer(factor, [1.0, 2.0, 0.5])
    model.set_interval_multipliers(pooled, per_component, table)
    expected = base * torch.as_tensor(per_component[[0, 3, 2]], dtype=base.dtype)[cells]
    scaled = model.decode(latent, s, cells=cells, symmetry=order).std
    torch.testing.assert_close(scaled, expected, rtol=1e-6, atol=0)
    # a file with one factor per class (every component) loads as such
    state = model.state_dict()
    state["class_std_factor"] = torch.as_tensor(factor, dtype=state["class_std_factor"].dtype)
    clone.load_state_dict(state)
    np.testing.assert_allclose(clone.class_factor(order), np.repeat(factor[[0, 3, 2], None], 3, 1))
    with pytest.raises(ValueError, match="class factors"):
        model.set_interval_multipliers(pooled, per_component[:, :2], table)


@pytest.mark.parametrize(
    ("physics", "orbits"), [("thermal", ((0, 1),)), ("mechanical", ((0, 1), (2,)))]
)
def test_response_orbits(physics, orbits):
    """Components the square's symmetries map onto one another, up to sign."""
    assert response_orbits(physics) == orbits
    for rot in D4:
        q = np.abs(response_matrix(rot, physics))
        for orbit in orbits:
            others = [j for j in range(q.shape[0]) if j not in orbit]
            assert not q[np.ix_(others, list(orbit))].any()


def _check_equivariant(fn, imgs, s, physics, rtol=1e-10):
    base = fn(imgs, s)
    for rot in D4:
        q = response_matrix(rot, physics)
        sm = state_matrix(rot, physics)
        moved = fn(transform_image(imgs, rot), s @ sm.T)
        np.testing.assert_allclose(moved[0], base[0] @ q.T, rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(moved[1], q @ base[1] @ np.linalg.inv(sm), rtol=rtol, atol=1e-12)
        if len(base) == 3:
            np.testing.assert_allclose(moved[2], base[2] @ np.abs(q).T, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_d4_average_of_reference_function_is_equivariant(physics):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(3 if physics == "mechanical" else 2, 3))
    w = rng.normal(size=(N_IMG, N_IMG))
    r = a.shape[0]

    def ref(imgs, s):  # deliberately not equivariant
        feat = (imgs * w).sum((1, 2))
        resp = s @ a.T * (1 + feat[:, None]) + 0.1 * (s @ a.T) ** 3
        tan = a[None] * (1 + feat[:, None, None]) + 0.3 * ((s @ a.T) ** 2)[:, :, None] * a[None]
        return resp, tan, np.abs(resp) + 0.1

    imgs = images(3, seed=8)
    s = rng.normal(size=(3, 3))
    with pytest.raises(AssertionError):
        _check_equivariant(ref, imgs, s, physics)
    avg = lambda i, x: d4_average(ref, i, x, physics)  # noqa: E731
    out = avg(imgs, s)
    assert out[0].shape == (3, r) and out[1].shape == (3, r, 3) and out[2].shape == (3, r)
    _check_equivariant(avg, imgs, s, physics)
    # The averaged tangent is the derivative of the averaged response.
    h = 1e-6
    for j in range(3):
        e = np.zeros(3)
        e[j] = h
        fd = (avg(imgs, s + e)[0] - avg(imgs, s - e)[0]) / (2 * h)
        np.testing.assert_allclose(out[1][:, :, j], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_d4_average_of_sano_is_equivariant(physics):
    model = make(physics, dtype=torch.float64)

    def predict(imgs, s):
        out = model(wavelet(imgs, torch.float64), torch.as_tensor(s))
        return out.response, out.tangent, out.std

    imgs = images(1, seed=11)
    s = states(physics, 1, dtype=torch.float64).numpy()
    _check_equivariant(lambda i, x: d4_average(predict, i, x, physics), imgs, s, physics, 1e-9)


def test_same_on_all_ranks(comm):
    from conftest import assert_same_on_all_ranks

    model = make("thermal")
    out = model(wavelet(images(2)), states("thermal", 2))
    assert_same_on_all_ranks(comm, out.response.detach().numpy())
    assert_same_on_all_ranks(comm, out.tangent.detach().numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = make("mechanical", dtype=torch.float64)
    c, s = wavelet(images(2), torch.float64), states("mechanical", 2, dtype=torch.float64)
    cpu = model(c, s)
    gpu = model.cuda()([x.cuda() for x in c], s.cuda())
    torch.testing.assert_close(gpu.response.cpu(), cpu.response)
    torch.testing.assert_close(gpu.tangent.cpu(), cpu.tangent)
    # the family statistics fit on the device of the latents, as training does on CUDA
    latents = torch.randn(40, model.config.latent, dtype=torch.float64)
    on_cpu = make("mechanical", dtype=torch.float64)
    on_cpu.fit_family(latents)
    model.fit_family(latents.cuda())
    for name in ("family_mean", "family_precision", "family_scale"):
        torch.testing.assert_close(getattr(model, name).cpu(), getattr(on_cpu, name))


# ----------------------------------------------------------------------------- ablation variants
ABLATIONS = [
    {"encoder": "wavelet", "attention": False},
    {"encoder": "cnn"},
    {"encoder": "descriptors"},
]


def haar(imgs: np.ndarray, dtype=torch.float64) -> list[torch.Tensor]:
    out = pywt.wavedec2(imgs, "haar", mode="periodization", level=LEVELS, axes=(-2, -1))
    return [torch.tensor(out[0][:, None], dtype=dtype)] + [
        torch.tensor(np.stack(d, 1), dtype=dtype) for d in out[1:]
    ]


def test_default_config_is_the_wavelet_attention_model():
    from neuroscale_coupling.surrogate.encoders import MultiScaleEncoder

    cfg = tiny()
    d = cfg.to_dict()
    assert d["encoder"] == "wavelet" and d["attention"] is True
    assert SANOConfig.from_dict(d) == cfg
    # A model file written before the ablation fields existed loads as the default model.
    old = {k: v for k, v in d.items() if k not in ("encoder", "attention")}
    assert SANOConfig.from_dict(old) == cfg
    model = make()
    assert isinstance(model.encoder, MultiScaleEncoder)
    assert len(model.encoder.layers) == cfg.layers
    assert set(make(encoder="wavelet", attention=True).state_dict()) == set(model.state_dict())
    with pytest.raises(ValueError, match="encoder"):
        SANOConfig(encoder="transformer")
    with pytest.raises(TypeError, match="attention"):
        SANOConfig(attention="no")


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
@pytest.mark.parametrize("variant", ABLATIONS, ids=lambda v: "-".join(map(str, v.values())))
def test_ablation_variants_shapes(physics, variant):
    model = make(physics, dtype=torch.float64, **variant)
    assert SANOConfig.from_dict(model.config.to_dict()) == model.config
    c = haar(images(3))
    latent, mass = model.encode(c, return_attention=True)
    assert latent.shape == (3, 8)
    assert mass.shape == (3, 2, LEVELS + 1) and torch.isnan(mass).all()
    assert torch.isnan(model.scale_attention(c)).all()
    s = states(physics, 5, dtype=torch.float64)
    pred = model.decode(latent, s, cells=torch.tensor([0, 1, 2, 1, 0]))
    r = 2 if physics == "thermal" else 3
    assert pred.response.shape == (5, r)
    assert pred.tangent.shape == (5, r, 3)
    assert pred.std.shape == (5, r)
    assert torch.isfinite(pred.response).all() and torch.isfinite(pred.tangent).all()
    # The decoder is the default model's, unchanged: same parameter names and shapes.
    dec = {k: v.shape for k, v in model.decoder.state_dict().items()}
    assert dec == {k: v.shape for k, v in make(physics).decoder.state_dict().items()}
    with pytest.raises(ValueError, match="coefficient"):
        model.encode(c[:-1])


def test_haar_band_fields_sum_to_the_image():
    from neuroscale_coupling.surrogate.encoders import haar_band_fields

    x = np.random.default_rng(5).random((2, N_IMG, N_IMG))
    f = haar_band_fields(haar(x))
    assert f.shape == (2, 1 + 3 * LEVELS, N_IMG, N_IMG)
    np.testing.assert_allclose(f.sum(1).numpy(), x, rtol=0, atol=1e-13)


def test_descriptor_encoder_sees_only_the_volume_fraction():
    model = make(dtype=torch.float64, encoder="descriptors")
    a = np.zeros((1, N_IMG, N_IMG))
    a[0, :4, :4] = 1.0  # same volume fraction, different arrangement
    b = np.zeros((1, N_IMG, N_IMG))
    b[0, 3:11, 5:7] = 1.0
    za, zb = model.encode(haar(a)), model.encode(haar(b))
    torch.testing.assert_close(za, zb, rtol=0, atol=1e-12)
    c = b.copy()
    c[0, 0, 0] = 1.0
    assert not torch.allclose(model.encode(haar(c)), za)


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_linear_term_is_positive_definite_and_derives_from_an_energy(physics):
    """The linear term's matrix is symmetric positive definite (mechanical: after the
    tensor-shear weight D = diag(1, 1, 2), Σ = D⁻¹ A E); the tangent checks above cover the
    whole response, this one the matrix alone."""
    thermal = physics == "thermal"
    model = make(physics, dtype=torch.float64, seed=2, linear_term=True, quartic_term=thermal)
    set_units(model, physics)
    latent = model.encode(wavelet(images(3), torch.float64))
    if thermal:  # A of ½ GᵀAG and B of ¼ (GᵀBG)², with their θ-derivatives
        s = states(physics, 3, dtype=torch.float64)
        mats = model.decoder.poly_matrices(model._normalize(s)[0], latent)
        assert len(mats) == 2
        for _, d in mats:
            torch.testing.assert_close(d, d.transpose(1, 2), rtol=0, atol=1e-14)
        matrices = [m for m, _ in mats]
    else:
        matrices = [model.decoder.linear_matrix(latent) * torch.tensor([1.0, 1.0, 2.0])[:, None]]
    for a in matrices:
        torch.testing.assert_close(a, a.transpose(1, 2), rtol=0, atol=1e-14)
        assert torch.linalg.eigvalsh(a).min() > 0
    with pytest.raises(ValueError, match="quartic_term"):
        tiny("mechanical", quartic_term=True)


def test_options_off_by_default_and_without_parameters():
    """fraction_input/linear_term are off by default (model files written before they
    existed hold neither); off, the model has no parameters for them; on, the encoder learns
    one latent component fewer."""
    cfg = tiny("thermal")
    assert not cfg.fraction_input and not cfg.linear_term and cfg.learned_latent == cfg.latent
    assert not any(k.startswith("decoder.lin") for k in SANO(cfg).state_dict())
    on = tiny("thermal", fraction_input=True, linear_term=True)
    assert on.learned_latent == on.latent - 1
    assert SANO(on).encoder.head.out_features == on.latent - 1
    with pytest.raises(ValueError, match="latent=1"):
        tiny("thermal", latent=1, fraction_input=True)


@pytest.mark.parametrize("zero_mode", ["odd", "shift"])
def test_stress_jacobian_fast_path_matches_autodiff(zero_mode):
    """The batched forward-propagated Jacobian of the stress decoder equals torch.func's
    jacfwd of the single-point reference :meth:`StressDecoder.hidden`."""
    model = make("mechanical", dtype=torch.float64, zero_mode=zero_mode, seed=4, decoder_layers=3)
    z = model.encode(wavelet(images(4), torch.float64))
    e = states("mechanical", 4, dtype=torch.float64) / 0.05
    dec = model.decoder
    k, jac = dec.hidden_and_jacobian(e, z)
    for i in range(4):
        torch.testing.assert_close(k[i], dec.hidden(e[i], z[i]), rtol=1e-12, atol=1e-14)
        ref = torch.func.jacfwd(lambda x, zi=z[i]: dec.hidden(x, zi))(e[i])
        torch.testing.assert_close(jac[i], ref, rtol=1e-10, atol=1e-13)


def test_family_unit_is_the_leave_one_out_quantile():
    """fit_family's unit equals the quantile of brute-force leave-one-out Mahalanobis
    distances (each distinct latent against the mean and ridged covariance of the rows that
    are not its copies); mean and precision weigh every row."""
    model = make("thermal", dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(30, model.config.latent, generator=gen, dtype=torch.float64)
    z = torch.cat([z, z[:5], z[:2]])  # copies: a cell drawn more than once
    model.fit_family(z, quantile=0.9)
    dim = z.shape[1]
    cov = torch.cov(z.T)
    ridge = 1e-3 * float(cov.diagonal().mean()) + 1e-12
    eye = torch.eye(dim, dtype=z.dtype)
    torch.testing.assert_close(model.family_mean, z.mean(0))
    torch.testing.assert_close(model.family_precision, torch.linalg.inv(cov + ridge * eye))
    dist = []
    for u in torch.unique(z, dim=0):
        rest = z[~(z == u).all(1)]
        diff = u - rest.mean(0)
        dist.append(float(diff @ torch.linalg.solve(torch.cov(rest.T) + ridge * eye, diff)) ** 0.5)
    expect = float(torch.quantile(torch.tensor(dist, dtype=torch.float64), 0.9))
    assert float(model.family_scale) == pytest.approx(expect, rel=1e-10)
    with pytest.raises(ValueError, match="3 distinct"):
        model.fit_family(torch.cat([z[:2], z[:2]]))

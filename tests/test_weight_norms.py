"""Weight-side normalizations: weight norm, spectral norm, weight standardization.

Pure functions against float64 formulas (hand-derived gradients, SVD) and PyTorch
(``torch.nn.utils.parametrizations``); the Linen wrappers against ``flax.linen.WeightNorm`` /
``SpectralNorm`` (variables and outputs); the NNX wrappers against the Linen ones and
``flax.nnx.SpectralNorm``; all under jit, grad and vmap. Everything float64 (``x64``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm.linen import SpectralNorm, WeightNorm, WeightStandardization
from jaxnorm.nnx import SpectralNorm as NnxSpectralNorm
from jaxnorm.nnx import WeightNorm as NnxWeightNorm
from jaxnorm.nnx import WeightStandardization as NnxWeightStandardization

torch = pytest.importorskip("torch")
parametrizations = torch.nn.utils.parametrizations

weight_norm = jaxnorm.weight_norm
spectral_norm = jaxnorm.spectral_norm
power_iteration = jaxnorm.power_iteration
standardize_weight = jaxnorm.standardize_weight

F64 = jnp.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _normal(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _column_norms(v: np.ndarray) -> np.ndarray:
    """Norm of every output feature (last axis) of a Flax-layout kernel."""
    return np.sqrt(np.sum(v.reshape(-1, v.shape[-1]) ** 2, axis=0))


# --- weight norm -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 4, 6)], ids=["dense", "conv"])
def test_weight_norm_is_g_times_unit_direction(shape):
    v, g = _normal(0, *shape), _normal(1, shape[-1])
    expected = g * v / _column_norms(v)
    np.testing.assert_allclose(weight_norm(v, g, eps=0.0), expected, **TIGHT)
    # PyTorch's kept-dims layout of g gives the same
    kept = g.reshape((1,) * (len(shape) - 1) + (-1,))
    np.testing.assert_allclose(weight_norm(v, kept, eps=0.0), expected, **TIGHT)


def test_weight_norm_feature_axes_variants():
    v = _normal(0, 4, 3, 5)
    g = _normal(1, 4, 5)
    norms = np.sqrt(np.sum(v**2, axis=1, keepdims=True))
    np.testing.assert_allclose(
        weight_norm(v, g, feature_axes=(0, 2), eps=0.0), g[:, None, :] * v / norms, **TIGHT
    )
    np.testing.assert_allclose(
        weight_norm(v, np.float64(2.5), feature_axes=None, eps=0.0),
        2.5 * v / np.linalg.norm(v), **TIGHT,
    )
    np.testing.assert_allclose(
        weight_norm(v, None, feature_axes=0, eps=0.0),
        v / np.sqrt(np.sum(v**2, axis=(1, 2), keepdims=True)), **TIGHT,
    )


def test_weight_norm_gradient_is_the_hand_derived_projection():
    """dL/dg = v̂·dw and dL/dv = g/‖v‖ (I − v̂v̂ᵀ) dw, per output feature."""
    v, g, cotangent = _normal(0, 6, 4), _normal(1, 4), _normal(2, 6, 4)
    grad_v, grad_g = jax.grad(
        lambda v, g: jnp.sum(weight_norm(v, g, eps=0.0) * cotangent), argnums=(0, 1)
    )(v, g)
    for j in range(4):
        norm = np.linalg.norm(v[:, j])
        unit = v[:, j] / norm
        projector = np.eye(6) - np.outer(unit, unit)
        np.testing.assert_allclose(grad_v[:, j], g[j] / norm * projector @ cotangent[:, j],
                                   **TIGHT)
        np.testing.assert_allclose(grad_g[j], unit @ cotangent[:, j], **TIGHT)


@pytest.mark.parametrize("dim", [0, None])
def test_weight_norm_matches_torch_parametrization(dim):
    layer = parametrizations.weight_norm(torch.nn.Linear(5, 3).double(), dim=dim)
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1  # (out, in)
    cotangent = _normal(3, 3, 5)
    (layer.weight * torch.from_numpy(cotangent)).sum().backward()

    def loss(v, g):
        w = weight_norm(v, g, feature_axes=0 if dim == 0 else None, eps=0.0)
        return jnp.sum(w * cotangent), w

    (grad_v, grad_g), w = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        v.detach().numpy(), g.detach().numpy()
    )
    np.testing.assert_allclose(w, layer.weight.detach().numpy(), **TIGHT)
    np.testing.assert_allclose(grad_v, v.grad.numpy(), **TIGHT)
    np.testing.assert_allclose(grad_g, g.grad.numpy(), **TIGHT)


def test_weight_norm_under_jit_and_vmap_matches_each_member():
    vs, gs = _normal(0, 3, 4, 2), _normal(1, 3, 2)
    batched = jax.jit(jax.vmap(weight_norm))(vs, gs)
    for member in range(3):
        np.testing.assert_allclose(batched[member], weight_norm(vs[member], gs[member]),
                                   **TIGHT)


def test_weight_norm_errors_name_the_argument():
    with pytest.raises(ValueError, match="g must have shape"):
        weight_norm(np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="feature_axes"):
        weight_norm(np.ones((3, 4)), None, feature_axes=2)
    with pytest.raises(ValueError, match="eps"):
        weight_norm(np.ones((3, 4)), None, eps=-1.0)


# --- spectral norm -----------------------------------------------------------------------


def test_power_iteration_converges_to_the_top_singular_value():
    w = _normal(0, 12, 5)
    u, v = power_iteration(w, _normal(1, 5), n_steps=300, eps=0.0)
    left, singular, right = np.linalg.svd(w)
    np.testing.assert_allclose(v @ w @ u, singular[0], rtol=1e-12)
    np.testing.assert_allclose(np.abs(u @ right[0]), 1.0, rtol=1e-10)
    np.testing.assert_allclose(np.abs(v @ left[:, 0]), 1.0, rtol=1e-10)


@pytest.mark.parametrize("shape", [(6, 4), (3, 3, 2, 5)], ids=["dense", "conv"])
def test_spectral_norm_sigma_matches_svd(shape):
    w, u = _normal(0, *shape), _normal(1, 1, shape[-1])
    w_hat, new_u, sigma = spectral_norm(w, u, n_steps=300)
    expected = np.linalg.svd(w.reshape(-1, shape[-1]), compute_uv=False)[0]
    np.testing.assert_allclose(sigma, expected, rtol=1e-12)
    np.testing.assert_allclose(w_hat, w / expected, rtol=1e-12)
    assert new_u.shape == u.shape
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(w_hat).reshape(-1, shape[-1]), compute_uv=False)[0],
        1.0, rtol=1e-12,
    )


def test_spectral_norm_one_step_is_the_hand_iteration():
    w, u = _normal(0, 7, 4), _normal(1, 4)
    v1 = w @ u / np.linalg.norm(w @ u)
    u1 = w.T @ v1 / np.linalg.norm(w.T @ v1)
    w_hat, new_u, sigma = spectral_norm(w, u, n_steps=1, eps=0.0)
    np.testing.assert_allclose(new_u, u1, **TIGHT)
    np.testing.assert_allclose(sigma, v1 @ w @ u1, **TIGHT)
    np.testing.assert_allclose(w_hat, w / (v1 @ w @ u1), **TIGHT)


def test_spectral_norm_gradient_holds_u_and_v_constant():
    """With σ = vᵀWu and u, v constant: the gradient of ⟨C, W/σ⟩ is C/σ − ⟨C, W⟩/σ² · v uᵀ."""
    w, u, cotangent = _normal(0, 7, 4), _normal(1, 4), _normal(2, 7, 4)
    grad = jax.grad(lambda w: jnp.sum(spectral_norm(w, u, n_steps=2)[0] * cotangent))(w)
    new_u, v = (np.asarray(a) for a in power_iteration(w, u, n_steps=2))
    sigma = v @ w @ new_u
    expected = cotangent / sigma - np.sum(cotangent * w) / sigma**2 * np.outer(v, new_u)
    np.testing.assert_allclose(grad, expected, **TIGHT)


@pytest.mark.parametrize(
    "make_layer",
    [lambda: torch.nn.Linear(6, 4), lambda: torch.nn.Conv2d(2, 4, 3)],
    ids=["linear", "conv"],
)
def test_spectral_norm_matches_torch_parametrization_in_training(make_layer):
    """PyTorch keeps the persistent vector on the input side of its (out, -1) matrix (its
    ``_v``): the same start and 3 iterations give its weight, new ``_v`` and gradient."""
    layer = parametrizations.spectral_norm(make_layer().double(), n_power_iterations=3)
    torch_norm = layer.parametrizations.weight[0]
    original = layer.parametrizations.weight.original
    shape = tuple(original.shape)
    start = _normal(1, int(np.prod(shape[1:])))
    torch_norm._v.copy_(torch.from_numpy(start))
    layer.train()
    weight = layer.weight  # one evaluation: runs the iteration and updates _u, _v
    cotangent = _normal(2, *shape)
    (weight * torch.from_numpy(cotangent)).sum().backward()

    def loss(w):
        w_hat, new_vector, _ = spectral_norm(w.reshape(shape[0], -1), start, n_steps=3)
        w_hat = w_hat.reshape(shape)
        return jnp.sum(w_hat * cotangent), (w_hat, new_vector)

    grad, (w_hat, new_vector) = jax.grad(loss, has_aux=True)(original.detach().numpy())
    close = {"rtol": 1e-10, "atol": 1e-12}
    np.testing.assert_allclose(w_hat, weight.detach().numpy(), **close)
    np.testing.assert_allclose(new_vector, torch_norm._v.numpy(), **close)
    np.testing.assert_allclose(grad, original.grad.numpy(), **close)


def test_spectral_norm_under_jit_and_vmap_matches_each_member():
    ws, us = _normal(0, 3, 5, 4), _normal(1, 3, 1, 4)
    batched = jax.jit(jax.vmap(lambda w, u: spectral_norm(w, u, n_steps=2)))(ws, us)
    for member in range(3):
        single = spectral_norm(ws[member], us[member], n_steps=2)
        for got, want in zip(batched, single, strict=True):
            np.testing.assert_allclose(got[member], want, **TIGHT)


def test_spectral_norm_errors_name_the_argument():
    with pytest.raises(ValueError, match="u must have shape"):
        spectral_norm(np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        spectral_norm(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="n_steps"):
        spectral_norm(np.ones((3, 4)), np.ones(4), n_steps=0)
    with pytest.raises(TypeError, match="n_steps"):
        spectral_norm(np.ones((3, 4)), np.ones(4), n_steps=1.5)


# --- weight standardization -----------------------------------------------------------


def _torch_standardized(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """timm's ``StdConv2d`` standardization of an ``(out, in, kh, kw)`` weight."""
    flat = weight.reshape(1, weight.shape[0], -1)
    return torch.nn.functional.batch_norm(
        flat, None, None, training=True, momentum=0.0, eps=eps
    ).reshape_as(weight)


def test_standardize_weight_and_its_gradient_match_torch():
    weight = torch.from_numpy(3.0 * _normal(0, 5, 3, 3, 3) + 1.0).requires_grad_()
    cotangent = _normal(1, 5, 3, 3, 3)
    expected = _torch_standardized(weight, 1e-6)
    (expected * torch.from_numpy(cotangent)).sum().backward()

    def loss(w):
        standardized = standardize_weight(w, input_axes=(1, 2, 3), eps=1e-6)
        return jnp.sum(standardized * cotangent), standardized

    grad, got = jax.grad(loss, has_aux=True)(weight.detach().numpy())
    np.testing.assert_allclose(got, expected.detach().numpy(), **TIGHT)
    np.testing.assert_allclose(grad, weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    # Flax layout (kh, kw, in, out), default input_axes
    flax_kernel = np.transpose(weight.detach().numpy(), (2, 3, 1, 0))
    np.testing.assert_allclose(
        standardize_weight(flax_kernel, eps=1e-6),
        np.transpose(expected.detach().numpy(), (2, 3, 1, 0)), **TIGHT,
    )


def test_standardize_weight_under_vmap_matches_each_member():
    kernels = _normal(0, 2, 3, 3, 2, 4)
    batched = jax.vmap(standardize_weight)(kernels)
    for member in range(2):
        np.testing.assert_allclose(batched[member], standardize_weight(kernels[member]),
                                   **TIGHT)


# --- Linen wrappers ----------------------------------------------------------------------

KEY = jax.random.key(0)
LINEN_WEIGHT_NORM_CASES = {
    "dense": (lambda: nn.Dense(5, param_dtype=F64), {}, (4, 3)),
    "conv": (lambda: nn.Conv(4, (3, 3), param_dtype=F64), {}, (2, 5, 5, 3)),
    "all-params-one-norm": (
        lambda: nn.Dense(5, param_dtype=F64),
        {"variable_filter": None, "feature_axes": None},
        (4, 3),
    ),
}


def _randomized(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([rng.normal(size=np.shape(leaf)) for leaf in leaves])


def _shapes(tree):
    return jax.tree.map(np.shape, tree)


@pytest.mark.parametrize("case", LINEN_WEIGHT_NORM_CASES)
def test_linen_weight_norm_matches_flax(case):
    make_layer, options, x_shape = LINEN_WEIGHT_NORM_CASES[case]
    x = _normal(5, *x_shape)
    ours = WeightNorm(make_layer(), param_dtype=F64, **options)
    theirs = nn.WeightNorm(make_layer(), param_dtype=F64, **options)
    variables = ours.init(KEY, x)
    assert _shapes(variables) == _shapes(theirs.init(KEY, x))
    params = _randomized(variables["params"], 6)
    np.testing.assert_allclose(
        ours.apply({"params": params}, x), theirs.apply({"params": params}, x), **TIGHT
    )


def test_linen_weight_norm_keeps_v_and_g_and_has_the_hand_gradient():
    x, cotangent = _normal(0, 4, 3), _normal(1, 4, 5)
    module = WeightNorm(nn.Dense(5, param_dtype=F64), param_dtype=F64, epsilon=0.0)
    variables = module.init(KEY, x)
    v = np.asarray(variables["params"]["layer_instance"]["kernel"])
    assert not np.allclose(_column_norms(v), 1.0)  # init stores the raw v (Flax: v/|v|)
    params = _randomized(variables["params"], 2)
    v, bias = params["layer_instance"]["kernel"], params["layer_instance"]["bias"]
    g = params["layer_instance/kernel/scale"]

    def loss(params):
        y, state = module.apply({"params": params}, x, mutable=True)
        return jnp.sum(y * cotangent), (y, state)

    grads, (y, state) = jax.grad(loss, has_aux=True)(params)
    # params mutable too: the wrapper still leaves them as they were
    jax.tree.map(np.testing.assert_array_equal, state["params"], params)
    np.testing.assert_allclose(y, x @ (g * v / _column_norms(v)) + bias, **TIGHT)
    grad_w = x.T @ cotangent
    unit = v / _column_norms(v)
    expected_g = np.sum(unit * grad_w, axis=0)
    expected_v = g / _column_norms(v) * (grad_w - unit * expected_g)
    np.testing.assert_allclose(grads["layer_instance/kernel/scale"], expected_g, **TIGHT)
    np.testing.assert_allclose(grads["layer_instance"]["kernel"], expected_v, **TIGHT)


@pytest.mark.parametrize(
    ("make_layer", "x_shape"),
    [
        (lambda: nn.Dense(5, param_dtype=F64), (4, 3)),
        (lambda: nn.Conv(4, (3, 3), param_dtype=F64), (2, 5, 5, 3)),
    ],
    ids=["dense", "conv"],
)
def test_linen_spectral_norm_matches_flax_over_training_steps(make_layer, x_shape):
    x = _normal(0, *x_shape)
    ours = SpectralNorm(make_layer(), n_steps=2, param_dtype=F64)
    theirs = nn.SpectralNorm(make_layer(), n_steps=2, param_dtype=F64)
    variables = ours.init(KEY, x, update_stats=False)
    flax_variables = theirs.init(KEY, x, update_stats=False)
    assert _shapes(variables) == _shapes(flax_variables)
    for ours_u, flax_u in zip(
        jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(flax_variables["batch_stats"]),
        strict=True,
    ):  # the same u from the same rng
        np.testing.assert_array_equal(ours_u, flax_u)
    params, stats, flax_stats = flax_variables["params"], variables["batch_stats"], None
    flax_stats = flax_variables["batch_stats"]
    for _ in range(3):
        y, update = ours.apply({"params": params, "batch_stats": stats}, x,
                               update_stats=True, mutable=["batch_stats"])
        y_flax, flax_update = theirs.apply({"params": params, "batch_stats": flax_stats}, x,
                                           update_stats=True, mutable=["batch_stats"])
        np.testing.assert_allclose(y, y_flax, **TIGHT)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), update, flax_update)
        stats, flax_stats = update["batch_stats"], flax_update["batch_stats"]
    y, frozen = ours.apply({"params": params, "batch_stats": stats}, x,
                           update_stats=False, mutable=["batch_stats"])
    np.testing.assert_allclose(
        y, theirs.apply({"params": params, "batch_stats": flax_stats}, x, update_stats=False),
        **TIGHT,
    )
    jax.tree.map(np.testing.assert_array_equal, frozen["batch_stats"], stats)


def _with_singular_values(seed: int, rows: int, columns: int, values) -> np.ndarray:
    left, _ = np.linalg.qr(_normal(seed, rows, rows))
    right, _ = np.linalg.qr(_normal(seed + 1, columns, columns))
    return left[:, : len(values)] @ np.diag(values) @ right[:, : len(values)].T


def test_linen_spectral_norm_matches_torch_and_its_stored_sigma():
    """PyTorch iterates from the other side (see ``spectral_norm``'s docstring), so the two
    agree once converged: a spectral gap of 3 and 40 steps each."""
    weight = _with_singular_values(0, 4, 6, [3.0, 1.0, 0.5, 0.2])  # PyTorch's (out, in)
    torch_layer = parametrizations.spectral_norm(
        torch.nn.Linear(6, 4).double(), n_power_iterations=40
    )
    torch_layer.parametrizations.weight.original.data.copy_(torch.from_numpy(weight))
    x = _normal(2, 5, 6)
    bias = torch_layer.bias.detach().numpy()
    expected = torch_layer.train()(torch.from_numpy(x)).detach().numpy()
    variables = {
        "params": {"layer_instance": {"kernel": weight.T, "bias": bias}},
        "batch_stats": {"layer_instance/kernel/u": _normal(3, 1, 4),
                        "layer_instance/kernel/sigma": 1.0},
    }
    module = SpectralNorm(nn.Dense(4, param_dtype=F64), n_steps=40, param_dtype=F64)
    y, update = module.apply(variables, x, update_stats=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    new_stats = update["batch_stats"]
    sigma = new_stats["layer_instance/kernel/sigma"]
    np.testing.assert_allclose(sigma, 3.0, rtol=1e-12)
    np.testing.assert_allclose(
        np.abs(new_stats["layer_instance/kernel/u"][0] @ torch_layer.parametrizations.weight[0]
               ._u.numpy()), 1.0, rtol=1e-12,
    )
    # evaluation by the stored sigma: exactly W / sigma, no iteration
    stored = SpectralNorm(nn.Dense(4, param_dtype=F64), use_stored_sigma=True, param_dtype=F64)
    y_eval = stored.apply({**variables, "batch_stats": new_stats}, x * 2, update_stats=False)
    np.testing.assert_allclose(y_eval, 2 * x @ (weight.T / sigma) + bias, **TIGHT)


def test_linen_spectral_norm_error_on_non_matrix():
    module = SpectralNorm(nn.Conv(2, (3, 3)), error_on_non_matrix=True)
    with pytest.raises(ValueError, match="error_on_non_matrix"):
        module.init(KEY, jnp.ones((1, 4, 4, 2)), update_stats=False)


def test_linen_weight_standardized_conv_matches_torch_std_conv():
    weight = _normal(0, 4, 3, 3, 3)
    bias, x = _normal(1, 4), _normal(2, 2, 3, 6, 6)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x), _torch_standardized(torch.from_numpy(weight), 1e-6),
        torch.from_numpy(bias),
    ).numpy()
    module = WeightStandardization(nn.Conv(4, (3, 3), padding="VALID", param_dtype=F64))
    variables = module.init(KEY, np.moveaxis(x, 1, -1))
    assert _shapes(variables) == {"params": {"layer_instance": {
        "kernel": (3, 3, 3, 4), "bias": (4,)}}}
    kernel = np.transpose(weight, (2, 3, 1, 0))
    y = module.apply({"params": {"layer_instance": {"kernel": kernel, "bias": bias}}},
                     np.moveaxis(x, 1, -1))
    np.testing.assert_allclose(np.moveaxis(y, -1, 1), expected, rtol=1e-10, atol=1e-12)


def test_linen_wrappers_under_jit_and_vmap():
    x = _normal(0, 3, 4, 2)  # three members of a vmapped batch of (4, 2) inputs
    module = WeightNorm(nn.Dense(3, param_dtype=F64), param_dtype=F64)
    params = _randomized(module.init(KEY, x[0])["params"], 1)
    apply = jax.jit(jax.vmap(lambda x: module.apply({"params": params}, x)))
    batched = apply(x)
    for member in range(3):
        np.testing.assert_allclose(batched[member], module.apply({"params": params}, x[member]),
                                   **TIGHT)
    spectral = SpectralNorm(nn.Dense(3, param_dtype=F64), param_dtype=F64)
    variables = spectral.init(KEY, x[0], update_stats=False)
    step = jax.jit(lambda v, x: spectral.apply(v, x, update_stats=True,
                                               mutable=["batch_stats"]))
    y, update = step(variables, x[0])
    y_eager, update_eager = spectral.apply(variables, x[0], update_stats=True,
                                           mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_eager, **TIGHT)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), update, update_eager)


# --- NNX wrappers ------------------------------------------------------------------------


def test_nnx_weight_norm_matches_linen_and_keeps_its_params():
    x, cotangent = _normal(0, 4, 3), _normal(1, 4, 5)
    model = NnxWeightNorm(nnx.Linear(3, 5, param_dtype=F64, rngs=nnx.Rngs(0)),
                          param_dtype=F64, epsilon=0.0, rngs=nnx.Rngs(0))
    v = _normal(2, 3, 5)
    g = _normal(3, 5)
    model.layer_instance.kernel[...] = v
    model.scales[("kernel",)][...] = g
    assert isinstance(model.scales[("kernel",)], nnx.Param)
    linen = WeightNorm(nn.Dense(5, param_dtype=F64), param_dtype=F64, epsilon=0.0)
    linen_params = {"layer_instance": {"kernel": v, "bias": np.zeros(5)},
                    "layer_instance/kernel/scale": g}

    @nnx.jit
    def step(model, x):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x) * cotangent))(model)

    for _ in range(2):  # the second call sees the same v: nothing was overwritten
        _, grads = step(model, x)
        np.testing.assert_array_equal(model.layer_instance.kernel[...], v)
    linen_grads = jax.grad(
        lambda p: jnp.sum(linen.apply({"params": p}, x) * cotangent)
    )(linen_params)
    np.testing.assert_allclose(model(x), linen.apply({"params": linen_params}, x), **TIGHT)
    np.testing.assert_allclose(grads["layer_instance"]["kernel"][...],
                               linen_grads["layer_instance"]["kernel"], **TIGHT)
    np.testing.assert_allclose(grads["scales"][("kernel",)][...],
                               linen_grads["layer_instance/kernel/scale"], **TIGHT)


def test_nnx_spectral_norm_matches_flax_nnx_state_and_first_call():
    x = _normal(0, 4, 3)

    def make(cls):
        return cls(nnx.Linear(3, 5, param_dtype=F64, rngs=nnx.Rngs(0)), n_steps=2,
                   param_dtype=F64, rngs=nnx.Rngs(1))

    ours, theirs = make(NnxSpectralNorm), make(nnx.SpectralNorm)
    assert _shapes(nnx.state(ours)) == _shapes(nnx.state(theirs))
    kernel = np.asarray(ours.layer_instance.kernel[...])
    np.testing.assert_allclose(ours(x), theirs(x), **TIGHT)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT),
                 nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
    # Flax NNX overwrote its kernel with W/σ; ours still holds W
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
    assert not np.allclose(theirs.layer_instance.kernel[...], kernel)


def test_nnx_spectral_norm_trains_and_evaluates_as_linen():
    x = _normal(0, 4, 3)
    model = NnxSpectralNorm(nnx.Linear(3, 5, param_dtype=F64, rngs=nnx.Rngs(0)), n_steps=1,
                            param_dtype=F64, rngs=nnx.Rngs(1))
    linen = SpectralNorm(nn.Dense(5, param_dtype=F64), param_dtype=F64)
    variables = {
        "params": {"layer_instance": {"kernel": model.layer_instance.kernel[...],
                                      "bias": model.layer_instance.bias[...]}},
        "batch_stats": {"layer_instance/kernel/u": model.batch_stats[("kernel", "u")][...],
                        "layer_instance/kernel/sigma": 1.0},
    }
    train = nnx.jit(lambda m, x: m(x))
    for _ in range(2):
        y = train(model, x)
        y_linen, update = linen.apply(variables, x, update_stats=True, mutable=["batch_stats"])
        variables = {**variables, **update}
        np.testing.assert_allclose(y, y_linen, **TIGHT)
        np.testing.assert_allclose(model.batch_stats[("kernel", "u")][...],
                                   variables["batch_stats"]["layer_instance/kernel/u"], **TIGHT)
    u = np.asarray(model.batch_stats[("kernel", "u")][...])
    model.eval()
    np.testing.assert_allclose(model(x), linen.apply(variables, x, update_stats=False), **TIGHT)
    viewed = nnx.view(model, use_running_average=True)
    viewed(x)
    np.testing.assert_array_equal(model.batch_stats[("kernel", "u")][...], u)


def test_nnx_weight_standardization_matches_linen():
    x = _normal(0, 2, 6, 6, 3)
    model = NnxWeightStandardization(
        nnx.Conv(3, 4, (3, 3), param_dtype=F64, rngs=nnx.Rngs(0))
    )
    kernel = np.asarray(model.layer_instance.kernel[...])
    linen = WeightStandardization(nn.Conv(4, (3, 3), param_dtype=F64))
    expected = linen.apply(
        {"params": {"layer_instance": {"kernel": kernel, "bias": np.zeros(4)}}}, x
    )
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), expected, **TIGHT)
    np.testing.assert_array_equal(model.layer_instance.kernel[...], kernel)

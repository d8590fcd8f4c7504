"""``jaxnorm.flax_variables_from_torch``: PyTorch modules with random parameters and
statistics (no download), converted, give the same eval-mode outputs in ``jaxnorm.linen``
(float64, NCHW input with the channel axis named, or moved last for Dense/Conv)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn
from jaxnorm.linen import SpectralNorm, WeightNorm
from jaxnorm.nnx import SpectralNorm as NnxSpectralNorm
from jaxnorm.nnx import WeightNorm as NnxWeightNorm

torch = pytest.importorskip("torch")
parametrizations = torch.nn.utils.parametrizations

F64 = jnp.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float64, random affine parameters and running statistics (variance > 0), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module.eval()


def _input(seed: int, *shape: int) -> np.ndarray:
    return 2.0 * np.random.default_rng(seed).normal(size=shape) + 0.5


def _torch_eval(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _single(state_dict) -> dict:
    converted = jaxnorm.flax_variables_from_torch(state_dict)
    assert list(converted) == [""]
    return converted[""]


@pytest.mark.parametrize(
    ("torch_module", "x_shape"),
    [
        (lambda: torch.nn.BatchNorm1d(5), (8, 5)),
        (lambda: torch.nn.BatchNorm1d(5), (4, 5, 7)),
        (lambda: torch.nn.BatchNorm2d(5, eps=1e-3), (2, 5, 4, 3)),
    ],
    ids=["bn1d-dense", "bn1d-sequence", "bn2d"],
)
def test_batch_norm_eval_matches_torch(torch_module, x_shape):
    module = _randomize(torch_module(), 0)
    x = _input(1, *x_shape)
    variables = _single(module.state_dict())
    assert set(variables["batch_stats"]) == {"mean", "var"}
    # running_var is copied as stored (PyTorch's unbiased estimate): eval is the same
    np.testing.assert_array_equal(variables["batch_stats"]["var"], module.running_var.numpy())
    flax_module = jl.BatchNorm(use_running_average=True, axis=1, epsilon=module.eps)
    np.testing.assert_allclose(flax_module.apply(variables, x), _torch_eval(module, x), **CLOSE)


@pytest.mark.parametrize("torch_momentum", [None, 0.1], ids=["cumulative", "momentum"])
def test_batch_norm_training_continues_as_torch(torch_momentum):
    """momentum=None: num_batches_tracked → count, jaxnorm momentum=None; otherwise
    momentum = 1 - torch's. With unbiased_running_var the next update is PyTorch's."""
    module = _randomize(torch.nn.BatchNorm2d(3, momentum=torch_momentum), 0)
    module.num_batches_tracked.fill_(4)
    cumulative = torch_momentum is None
    variables = jaxnorm.flax_variables_from_torch(
        module.state_dict(), cumulative_average=cumulative
    )[""]
    if cumulative:
        assert variables["batch_stats"]["count"] == 4
    x = _input(2, 6, 3, 4, 4)
    module.train()(torch.from_numpy(x))
    flax_module = jl.BatchNorm(
        use_running_average=False, axis=1, epsilon=module.eps, unbiased_running_var=True,
        momentum=None if cumulative else 1 - torch_momentum,
    )
    _, update = flax_module.apply(variables, x, mutable=["batch_stats"])
    stats = update["batch_stats"]
    np.testing.assert_allclose(stats["mean"], module.running_mean.numpy(), **CLOSE)
    np.testing.assert_allclose(stats["var"], module.running_var.numpy(), **CLOSE)
    if cumulative:
        assert stats["count"] == module.num_batches_tracked.item()


def test_affine_norms_eval_match_torch():
    x = _input(0, 2, 6, 4, 3)  # NCHW
    cases = [
        (torch.nn.GroupNorm(3, 6), jl.GroupNorm(num_groups=3, feature_axis=1, epsilon=1e-5)),
        (torch.nn.InstanceNorm2d(6, affine=True),
         jl.InstanceNorm(feature_axes=1, epsilon=1e-5)),
        (torch.nn.LayerNorm(3), jl.LayerNorm(epsilon=1e-5)),
        (torch.nn.LayerNorm((4, 3)),
         jl.LayerNorm(epsilon=1e-5, reduction_axes=(-2, -1), feature_axes=(-2, -1))),
        (torch.nn.RMSNorm(3, eps=1e-6), jl.RMSNorm(epsilon=1e-6)),
    ]
    for seed, (torch_module, flax_module) in enumerate(cases):
        torch_module = _randomize(torch_module, seed)
        variables = _single(torch_module.state_dict())
        np.testing.assert_allclose(
            flax_module.apply(variables, x), _torch_eval(torch_module, x), **CLOSE,
            err_msg=type(torch_module).__name__,
        )


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


WRAPPED_LAYERS = {
    "linear": (lambda: torch.nn.Linear(6, 4), lambda: nn.Dense(4, param_dtype=F64), (5, 6)),
    "conv2d": (
        lambda: torch.nn.Conv2d(3, 4, 3),
        lambda: nn.Conv(4, (3, 3), padding="VALID", param_dtype=F64),
        (2, 3, 6, 5),
    ),
}


def _flax_eval(module: nn.Module, variables: dict, x: np.ndarray, **kwargs) -> np.ndarray:
    if x.ndim == 4:
        return np.moveaxis(np.asarray(module.apply(variables, _nhwc(x), **kwargs)), -1, 1)
    return np.asarray(module.apply(variables, x, **kwargs))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("layer", WRAPPED_LAYERS)
@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
def test_weight_norm_layers_eval_match_torch(layer, api):
    make_torch, make_flax, x_shape = WRAPPED_LAYERS[layer]
    register = (parametrizations.weight_norm if api == "parametrizations"
                else torch.nn.utils.weight_norm)
    torch_module = _randomize(register(make_torch()), 0)
    x = _input(1, *x_shape)
    variables = _single(torch_module.state_dict())
    module = WeightNorm(make_flax(), param_dtype=F64, epsilon=0.0)
    np.testing.assert_allclose(
        _flax_eval(module, variables, x), _torch_eval(torch_module, x), **CLOSE
    )


def test_weight_norm_over_the_whole_tensor_maps_to_feature_axes_none():
    torch_module = _randomize(parametrizations.weight_norm(torch.nn.Linear(6, 4), dim=None), 0)
    x = _input(1, 5, 6)
    variables = _single(torch_module.state_dict())
    assert variables["params"]["layer_instance/kernel/scale"].shape == ()
    module = WeightNorm(nn.Dense(4, param_dtype=F64), param_dtype=F64, epsilon=0.0,
                        feature_axes=None)
    np.testing.assert_allclose(module.apply(variables, x), _torch_eval(torch_module, x), **CLOSE)


@pytest.mark.parametrize("layer", WRAPPED_LAYERS)
@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
def test_spectral_norm_layers_eval_match_torch(layer, api):
    """Unconverged u, v after a few training calls: eval by the stored sigma is PyTorch's."""
    make_torch, make_flax, x_shape = WRAPPED_LAYERS[layer]
    register = (parametrizations.spectral_norm if api == "parametrizations"
                else torch.nn.utils.spectral_norm)
    torch_module = _randomize(register(make_torch()), 0)
    x = _input(1, *x_shape)
    torch_module.train()
    for _ in range(2):
        torch_module(torch.from_numpy(x))
    torch_module.eval()
    variables = _single(torch_module.state_dict())
    assert variables["batch_stats"]["layer_instance/kernel/u"].shape == (1, 4)
    module = SpectralNorm(make_flax(), param_dtype=F64, use_stored_sigma=True)
    np.testing.assert_allclose(
        _flax_eval(module, variables, x, update_stats=False), _torch_eval(torch_module, x),
        **CLOSE,
    )


def test_converted_variables_load_into_nnx_modules():
    """The recipes in the docstring: nnx.update with the converted arrays."""
    x = _input(0, 2, 6)
    batch_norm = _randomize(torch.nn.BatchNorm1d(6), 0)
    v = _single(batch_norm.state_dict())
    model = jn.BatchNorm(6, use_running_average=True, axis=1, epsilon=batch_norm.eps,
                         param_dtype=F64, rngs=nnx.Rngs(0))
    nnx.update(model, {**v["params"], **v["batch_stats"]})
    np.testing.assert_allclose(model(x), _torch_eval(batch_norm, x), **CLOSE)

    weight_normed = _randomize(parametrizations.weight_norm(torch.nn.Linear(6, 4)), 1)
    v = _single(weight_normed.state_dict())["params"]
    model = NnxWeightNorm(nnx.Linear(6, 4, param_dtype=F64, rngs=nnx.Rngs(0)),
                          epsilon=0.0, param_dtype=F64, rngs=nnx.Rngs(0))
    nnx.update(model, {"layer_instance": v["layer_instance"],
                       "scales": {("kernel",): v["layer_instance/kernel/scale"]}})
    np.testing.assert_allclose(model(x), _torch_eval(weight_normed, x), **CLOSE)

    spectral = _randomize(parametrizations.spectral_norm(torch.nn.Linear(6, 4)), 2)
    v = _single(spectral.state_dict())
    model = NnxSpectralNorm(nnx.Linear(6, 4, param_dtype=F64, rngs=nnx.Rngs(0)),
                            param_dtype=F64, use_stored_sigma=True, update_stats=False,
                            rngs=nnx.Rngs(0))
    stats = v["batch_stats"]
    nnx.update(model, {
        "layer_instance": v["params"]["layer_instance"],
        "batch_stats": {("kernel", "u"): stats["layer_instance/kernel/u"],
                        ("kernel", "sigma"): stats["layer_instance/kernel/sigma"]},
    })
    np.testing.assert_allclose(model(x), _torch_eval(spectral, x), **CLOSE)


def test_float32_checkpoint_without_x64():
    module = _randomize(torch.nn.BatchNorm2d(4), 0).float()
    x = _input(1, 2, 4, 3, 3).astype(np.float32)
    with jax.enable_x64(False):
        variables = _single(module.state_dict())
        y = jl.BatchNorm(use_running_average=True, axis=1).apply(variables, x)
        assert y.dtype == np.float32
    np.testing.assert_allclose(y, _torch_eval(module, x), rtol=1e-5, atol=1e-5)


def test_whole_model_converts_only_its_norms():
    model = _randomize(torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.GroupNorm(2, 6),
        parametrizations.spectral_norm(torch.nn.Conv2d(6, 4, 1)),
        torch.nn.Flatten(),
        torch.nn.LayerNorm(4 * 4 * 3),
        parametrizations.weight_norm(torch.nn.Linear(48, 2)),
    ), 0)
    converted = jaxnorm.flax_variables_from_torch(model.state_dict())
    assert sorted(converted) == ["1", "3", "4", "6", "7"]
    chosen = jaxnorm.flax_variables_from_torch(model.state_dict(), modules=["3"])
    assert list(chosen) == ["3"]
    with pytest.raises(ValueError, match="'0' is not a normalization"):
        jaxnorm.flax_variables_from_torch(model.state_dict(), modules=["0"])
    with pytest.raises(KeyError, match="missing"):
        jaxnorm.flax_variables_from_torch(model.state_dict(), modules=["missing"])


def test_unsupported_layouts_raise_naming_the_module():
    transposed = parametrizations.spectral_norm(torch.nn.ConvTranspose2d(3, 5, 3))
    with pytest.raises(ValueError, match="dim other than 0"):
        jaxnorm.flax_variables_from_torch({f"up.{k}": v
                                           for k, v in transposed.state_dict().items()})
    weight_norm_dim1 = parametrizations.weight_norm(torch.nn.Linear(3, 5), dim=1)
    with pytest.raises(ValueError, match="'fc': weight norm over dim"):
        jaxnorm.flax_variables_from_torch({f"fc.{k}": v
                                           for k, v in weight_norm_dim1.state_dict().items()})
    with pytest.raises(ValueError, match="num_batches_tracked"):
        jaxnorm.flax_variables_from_torch(
            {"running_mean": np.zeros(2), "running_var": np.ones(2)}, cumulative_average=True
        )

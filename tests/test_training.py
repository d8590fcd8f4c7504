"""Training with jaxnorm modules: optax under jit lowers the loss, evaluation is
deterministic, and a TrainState carries batch_stats (Linen) / BatchStat (NNX)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

from jaxnorm import linen as jl
from jaxnorm import nnx as jx


def _images(count=64, seed=0):
    """8x8 one-channel images; the label says whether the top half is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    images = rng.standard_normal((count, 8, 8, 1)).astype(np.float32)
    images[:, :4] += np.where(labels, 1.0, -1.0)[:, None, None, None]
    return images * 2.0 + 3.0, labels


class ConvBnLeakyRelu(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(8, (3, 3))(x)
        x = jl.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.leaky_relu(x, 0.1)
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = jl.BatchRenorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.leaky_relu(x, 0.1)
        return nn.Dense(2)(x.mean((1, 2)))


class TrainState(train_state.TrainState):
    batch_stats: Any


@jax.jit
def _train_step(state: TrainState, images, labels):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state, loss


@jax.jit
def _evaluate(state: TrainState, images):
    return state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )


def test_linen_conv_bn_leaky_relu_trains_with_a_train_state():
    images, labels = _images()
    model = ConvBnLeakyRelu()
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), images, train=False
    )
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adam(1e-2),
    )
    initial_stats = state.batch_stats
    losses = []
    for _ in range(40):
        state, loss = _train_step(state, images, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]

    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), state.batch_stats, initial_stats)
    assert all(jax.tree.leaves(moved))
    logits = _evaluate(state, images)
    assert (np.argmax(logits, -1) == labels).mean() > 0.9
    # evaluation is deterministic and independent of the other examples in the batch
    np.testing.assert_array_equal(_evaluate(state, images), logits)
    np.testing.assert_allclose(_evaluate(state, images[::-1])[::-1], logits, rtol=1e-5,
                               atol=1e-5)


class NnxConvBn(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.norm = jx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.leaky_relu(self.norm(self.conv(x)), 0.1)
        return self.head(x.mean((1, 2)))


@nnx.jit
def _nnx_train_step(model, optimizer, images, labels):
    def loss_fn(model):
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_model_trains_and_evaluates_deterministically():
    images, labels = _images()
    model = nnx.jit(lambda: NnxConvBn(nnx.Rngs(0)))()  # one compile for the initialisers
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    losses = [float(_nnx_train_step(model, optimizer, images, labels)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(model.norm.mean[...], 0)

    model.eval()
    evaluate = nnx.jit(lambda m, x: m(x))
    stats = np.asarray(model.norm.var[...])
    # full float32 convolutions (GPUs default to TF32, whose round-off at the two batch
    # sizes' different convolution algorithms exceeds 1e-5); float32 round-off of logits
    # of order 1 is ~1e-6. Batch statistics leaking into evaluation would move them ~1e-1.
    with jax.default_matmul_precision("highest"):
        logits = evaluate(model, images)
        np.testing.assert_array_equal(model.norm.var[...], stats)
        np.testing.assert_allclose(evaluate(model, images[:5]), logits[:5], rtol=1e-5,
                                   atol=1e-5)
    assert (np.argmax(logits, -1) == labels).mean() > 0.9

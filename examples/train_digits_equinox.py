"""A small Equinox ResNet on scikit-learn's digits, trained with ``equinox.nn``'s
normalization layers and with ``jaxnorm.equinox``'s (one import swapped), side by side.

    python examples/train_digits_equinox.py              # 8 epochs each, ~30 s on 2 CPUs
    python examples/train_digits_equinox.py --quick      # CI smoke run: 4 epochs, cheap compiles

The model is written once against a ``nn`` namespace (``equinox.nn`` or
``jaxnorm.equinox``): a stem convolution, two residual blocks of conv-BatchNorm-ReLU and a
GroupNorm + LayerNorm head. Both runs start from the same weights (the same keys) and see
the same batches; BatchNorm uses ``mode="batch"`` in both. The table reports test accuracy
(inference mode: running statistics), the training loss, the first step's time (the
compile, with one step) and the time per step after it.
``momentum=0.9`` keeps Equinox's inference variance near the right one within a few
epochs: Equinox bias-corrects the running variance with its initial value 1 still in it
(an excess of :math:`m^k/(1-m^k)`, see ``docs/guides/equinox.md``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jaxnorm.equinox  # noqa: E402
from train_digits import load_digit_split  # noqa: E402

LIBRARIES = {"equinox.nn": eqx.nn, "jaxnorm.equinox": jaxnorm.equinox}
AXIS = "batch"
MOMENTUM = 0.9


class Block(eqx.Module):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.Module
    conv2: eqx.nn.Conv2d
    norm2: eqx.Module

    def __init__(self, nn: ModuleType, channels: int, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k1)
        self.norm1 = nn.BatchNorm(channels, AXIS, momentum=MOMENTUM, mode="batch")
        self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = nn.BatchNorm(channels, AXIS, momentum=MOMENTUM, mode="batch")

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        y, state = self.norm1(self.conv1(x), state)
        y, state = self.norm2(self.conv2(jax.nn.relu(y)), state)
        return jax.nn.relu(x + y), state


class ResNet(eqx.Module):
    """Stem, two residual blocks, a normalized pooled head: 8x8x1 images to 10 logits."""

    stem: eqx.nn.Conv2d
    stem_norm: eqx.Module
    blocks: tuple[Block, ...]
    group: eqx.Module
    layer: eqx.Module
    head: eqx.nn.Linear

    def __init__(self, nn: ModuleType, key: jax.Array, channels: int = 16) -> None:
        keys = jax.random.split(key, 4)
        self.stem = eqx.nn.Conv2d(1, channels, 3, padding=1, use_bias=False, key=keys[0])
        self.stem_norm = nn.BatchNorm(channels, AXIS, momentum=MOMENTUM, mode="batch")
        self.blocks = tuple(Block(nn, channels, k) for k in keys[1:3])
        self.group = nn.GroupNorm(4, channels)
        self.layer = nn.LayerNorm(channels)
        self.head = eqx.nn.Linear(channels, 10, key=keys[3])

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        y, state = self.stem_norm(self.stem(x), state)
        y = jax.nn.relu(y)
        for block in self.blocks:
            y, state = block(y, state)
        pooled = jnp.mean(self.group(y), axis=(1, 2))
        return self.head(self.layer(pooled)), state


def batched(model: ResNet, images: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, Any]:
    """The model over a batch: the examples mapped with ``axis_name``, the state shared."""
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name=AXIS)(
        images, state)


def make_step(optimizer: optax.GradientTransformation) -> Any:
    """One training step: cross-entropy, gradients of the arrays, an optimizer update."""

    @eqx.filter_jit
    def step(model, state, opt_state, images, labels):
        def loss_fn(model):
            logits, new_state = batched(model, images, state)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    return step


@eqx.filter_jit
def predict(model: ResNet, state: eqx.nn.State, images: jax.Array) -> jax.Array:
    """Class predictions in inference mode (running statistics)."""
    logits, _ = batched(eqx.nn.inference_mode(model), images, state)
    return jnp.argmax(logits, axis=-1)


def train(library: str, data: Any, epochs: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Trains the ResNet built from ``library``'s layers; returns its table row."""
    model, state = eqx.nn.make_with_state(ResNet)(LIBRARIES[library], jax.random.key(seed))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    step = make_step(optimizer)
    train_x = jnp.asarray(np.moveaxis(data.train_images, -1, 1))  # channels first
    train_y = jnp.asarray(data.train_labels)
    order = np.random.default_rng(seed)
    steps, loss, start = 0, float("nan"), time.perf_counter()
    first_step = 0.0
    for _ in range(epochs):
        permutation = order.permutation(len(train_x))
        for begin in range(0, len(train_x) - batch_size + 1, batch_size):
            index = permutation[begin:begin + batch_size]
            model, state, opt_state, loss = step(model, state, opt_state, train_x[index],
                                                 train_y[index])
            steps += 1
            if steps == 1:  # the compile, timed apart from the steady steps
                jax.block_until_ready(loss)
                first_step = time.perf_counter() - start
                start = time.perf_counter()
    jax.block_until_ready(loss)
    seconds = time.perf_counter() - start
    predictions = predict(model, state, jnp.asarray(np.moveaxis(data.test_images, -1, 1)))
    accuracy = float(np.mean(np.asarray(predictions) == data.test_labels))
    return {"library": library, "test_accuracy": accuracy, "train_loss": float(loss),
            "steps": steps, "first_step_seconds": first_step,
            "seconds_per_step": seconds / max(steps - 1, 1)}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a plain-text table."""
    lines = [(f"{'library':<18}{'test acc':>10}{'train loss':>12}{'steps':>7}"
              f"{'compile s':>11}{'ms/step':>9}")]
    for row in rows:
        lines.append(f"{row['library']:<18}{100 * row['test_accuracy']:>9.1f}%"
                     f"{row['train_loss']:>12.4f}{row['steps']:>7}"
                     f"{row['first_step_seconds']:>11.2f}{1000 * row['seconds_per_step']:>9.1f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default 8, 4 with --quick")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: 4 epochs, unoptimized XLA compiles")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains with both libraries, prints the table and returns its rows."""
    args = parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 8)
    data = load_digit_split()
    print(f"digits: {len(data.train_images)} train / {len(data.test_images)} test, "
          f"ResNet, {epochs} epochs, batch {args.batch_size}")
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", args.quick or previous)
    try:
        rows = [train(name, data, epochs, args.batch_size, args.seed) for name in LIBRARIES]
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    print("\n" + format_table(rows))
    return rows


if __name__ == "__main__":
    main()

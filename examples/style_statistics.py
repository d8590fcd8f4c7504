"""Style lives in channel statistics: AdaIN and conditional instance norm on the digits.

    python examples/style_statistics.py  # writes runs/adain.png, runs/conditional_instance_norm.png

1. **AdaIN** (Huang & Belongie 2017). A small convolutional autoencoder learns to reconstruct
   the digits. Re-styling replaces the per-channel mean and standard deviation of a content
   image's features by those of a style image,
   ``AdaIN(c, s) = σ(s) · (c − μ(c)) / σ(c) + μ(s)``, and decodes: the digit keeps its shape
   and takes the style image's stroke weight and contrast. Grid: rows are content images,
   columns style images.
2. **Conditional instance norm** (Dumoulin et al. 2017). One network renders a digit in one
   of several styles (as is, bold, blurred, inverted); every convolution is shared and a style
   is nothing but its own instance-norm ``scale`` and ``bias``. Grid: rows are digits,
   columns styles.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from sklearn.datasets import load_digits

import jaxnorm
from jaxnorm import linen as jnn

Array = jax.Array


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(N, 8, 8, 1)`` float32 in [0, 1], and their labels."""
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[..., None], digits.target


class Encoder(nn.Module):
    """8×8×1 image → 8×8×32 features."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.relu(nn.Conv(32, (3, 3))(x))


class Decoder(nn.Module):
    """8×8×32 features → 8×8×1 image in [0, 1]."""

    @nn.compact
    def __call__(self, features: Array) -> Array:
        x = nn.relu(nn.Conv(16, (3, 3))(features))
        return nn.sigmoid(nn.Conv(1, (3, 3))(x))


class AutoEncoder(nn.Module):
    """Encoder and decoder; ``restyle`` decodes AdaIN of two encodings."""

    def setup(self) -> None:
        self.encoder = Encoder()
        self.decoder = Decoder()

    def __call__(self, images: Array) -> Array:
        return self.decoder(self.encoder(images))

    def encode(self, images: Array) -> Array:
        return self.encoder(images)

    def restyle(self, content: Array, style: Array) -> Array:
        """``decode(AdaIN(encode(content), encode(style)))``."""
        features = jaxnorm.adaptive_instance_norm(self.encoder(content), self.encoder(style))
        return self.decoder(features)


STYLES = ("as is", "bold", "blurred", "inverted")


def apply_style(images: Array, style: int) -> Array:
    """The training targets of the conditional network: ``images`` unchanged, with heavier
    strokes (``sqrt``), blurred (3×3 mean filter) or inverted."""
    targets = (
        images,
        jnp.sqrt(images),
        nn.avg_pool(images, (3, 3), (1, 1), padding="SAME", count_include_pad=False),
        1.0 - images,
    )
    return targets[style]


class ConditionalStyler(nn.Module):
    """conv → conditional instance norm → ReLU (×2) → conv → sigmoid. Every convolution
    is shared by all styles; style ``s`` only selects its own ``scale[s]`` and ``bias[s]``."""

    num_styles: int
    features: int = 32

    @nn.compact
    def __call__(self, images: Array, style: Array) -> Array:
        x = images
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
            x = nn.relu(jnn.ConditionalInstanceNorm(self.num_styles)(x, style))
        return nn.sigmoid(nn.Conv(1, (3, 3))(x))


UNOPTIMIZED = {"xla_backend_optimization_level": 0}


def run_once(function: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(function)(*args)`` compiled without XLA's backend optimizations: for code
    that runs once (initialization, rendering), where optimizing costs more than it saves."""
    return jax.jit(function).lower(*args).compile(UNOPTIMIZED)(*args)


def fit(
    loss: Callable[[Any, Array], Array],
    params: Any,
    batches: Callable[[int], Array],
    steps: int,
    learning_rate: float = 3e-3,
    optimize: bool = True,
) -> tuple[Any, float]:
    """``steps`` Adam steps of ``loss(params, batch)`` on ``batches(step)``; returns the
    parameters and the last loss. ``optimize=False`` compiles the step without XLA's
    backend optimizations (faster to compile, slower to run: for smoke tests)."""
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def step(params: Any, opt_state: Any, batch: Array) -> tuple[Any, Any, Array]:
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = run_once(optimizer.init, params)
    compiled_step = (
        jax.jit(step)
        .lower(params, opt_state, batches(0))
        .compile(None if optimize else UNOPTIMIZED)
    )
    value = jnp.nan
    for index in range(steps):
        params, opt_state, value = compiled_step(params, opt_state, batches(index))
    return params, float(value)


def sampler(images: np.ndarray, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
    """``step -> a random batch`` of ``images`` (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    return lambda _: images[rng.integers(0, len(images), batch_size)]


def save_grid(
    path: Path,
    rows: np.ndarray,
    columns: np.ndarray | None,
    cells: np.ndarray,
    column_titles: Sequence[str],
    title: str,
) -> None:
    """A PNG grid: a header column of ``rows`` images, an optional header row of
    ``columns`` images, and ``cells[r, c]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_rows, num_columns = cells.shape[:2]
    header = 1 if columns is not None else 0
    figure, axes = plt.subplots(
        num_rows + header, num_columns + 1, figsize=(1.3 * (num_columns + 1), 1.3 * (num_rows + 1))
    )
    for ax in axes.flat:
        ax.axis("off")
    show = {"cmap": "gray_r", "vmin": 0.0, "vmax": 1.0}
    for c in range(num_columns):
        axes[0, c + 1].set_title(column_titles[c], fontsize=9)
        if columns is not None:
            axes[0, c + 1].imshow(columns[c, ..., 0], **show)
    for r in range(num_rows):
        axes[r + header, 0].imshow(rows[r, ..., 0], **show)
        for c in range(num_columns):
            axes[r + header, c + 1].imshow(cells[r, c, ..., 0], **show)
    axes[0, 0].set_title("content", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def adain_demo(
    images: np.ndarray, labels: np.ndarray, steps: int, out: Path, optimize: bool = True
) -> dict[str, float]:
    """Trains the autoencoder, re-styles one image of each of the digits 0–5 with the
    statistics of the thinnest, two middle and the boldest images, and saves the grid."""
    model = AutoEncoder()
    params = run_once(model.init, jax.random.key(0), images[:1])

    def reconstruction_loss(params: Any, batch: Array) -> Array:
        return jnp.mean((model.apply(params, batch) - batch) ** 2)

    params, loss = fit(
        reconstruction_loss, params, sampler(images, 128, seed=0), steps, optimize=optimize
    )

    content = np.stack([images[np.flatnonzero(labels == digit)[0]] for digit in range(6)])
    ink = images.mean(axis=(1, 2, 3))
    order = np.argsort(ink)
    style = images[order[[0, len(order) // 3, 2 * len(order) // 3, -1]]]
    pairs_content = np.repeat(content, len(style), axis=0)
    pairs_style = np.tile(style, (len(content), 1, 1, 1))

    def restyle_and_check(params: Any, content: Array, style: Array) -> tuple[Array, Array]:
        """Re-styled images, and how far AdaIN's output features are from having the
        style features' channel means (it should be float32 round-off)."""
        restyled = model.apply(params, content, style, method=AutoEncoder.restyle)
        features = model.apply(params, content, method=AutoEncoder.encode)
        style_features = model.apply(params, style, method=AutoEncoder.encode)
        mixed = jaxnorm.adaptive_instance_norm(features, style_features)
        error = jnp.max(jnp.abs(mixed.mean(axis=(1, 2)) - style_features.mean(axis=(1, 2))))
        return restyled, error

    restyled, mean_error = run_once(restyle_and_check, params, pairs_content, pairs_style)
    cells = np.asarray(restyled).reshape(len(content), len(style), *images.shape[1:])

    save_grid(
        out / "adain.png",
        content,
        style,
        cells,
        [f"ink {ink[i]:.2f}" for i in order[[0, len(order) // 3, 2 * len(order) // 3, -1]]],
        "AdaIN: content features with the style image's channel mean and std",
    )
    return {"adain_reconstruction_mse": loss, "adain_channel_mean_error": float(mean_error)}


def conditional_instance_norm_demo(
    images: np.ndarray, steps: int, out: Path, optimize: bool = True
) -> dict[str, float]:
    """Trains one :class:`ConditionalStyler` on every style of :data:`STYLES` and renders
    eight digits in each; saves the grid."""
    model = ConditionalStyler(num_styles=len(STYLES))
    params = run_once(model.init, jax.random.key(1), images[:1], np.zeros((1,), np.int32))
    styles = jnp.arange(len(STYLES))

    def style_loss(params: Any, batch: Array) -> Array:
        # every image of the batch in every style: style id s for the s-th copy
        inputs = jnp.tile(batch, (len(STYLES), 1, 1, 1))
        ids = jnp.repeat(styles, len(batch))
        targets = jnp.concatenate([apply_style(batch, s) for s in range(len(STYLES))])
        return jnp.mean((model.apply(params, inputs, ids) - targets) ** 2)

    params, loss = fit(style_loss, params, sampler(images, 64, seed=1), steps, optimize=optimize)

    content = images[:8]
    ids = np.repeat(np.arange(len(STYLES), dtype=np.int32), len(content))
    rendered = run_once(model.apply, params, np.tile(content, (len(STYLES), 1, 1, 1)), ids)
    cells = np.asarray(rendered).reshape(len(STYLES), *content.shape).swapaxes(0, 1)
    save_grid(
        out / "conditional_instance_norm.png",
        content,
        None,
        cells,
        list(STYLES),
        "Conditional instance norm: one network, a (scale, bias) per style",
    )
    return {"conditional_instance_norm_mse": loss}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Runs both demonstrations; returns their final losses and the AdaIN statistics check."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: 10 steps, unoptimized XLA compiles"
    )
    args = parser.parse_args(argv)
    steps = args.steps or (10 if args.quick else 300)
    args.out.mkdir(parents=True, exist_ok=True)

    images, labels = load_images()
    optimize = not args.quick
    metrics = adain_demo(images, labels, steps, args.out, optimize)
    metrics |= conditional_instance_norm_demo(images, steps, args.out, optimize)
    for name, value in metrics.items():
        print(f"{name}: {value:.2e}")
    print(f"wrote {args.out / 'adain.png'} and {args.out / 'conditional_instance_norm.png'}")
    return metrics


if __name__ == "__main__":
    main()

"""Compare normalizations on scikit-learn's handwritten digits, then fold BatchNorm.

    python examples/train_digits.py                      # 7 norms on the ResNet, ~2 min on 2 CPUs
    python examples/train_digits.py --model darknet --norms batch group
    python examples/train_digits.py --devices 4          # data-parallel, synchronized BatchNorm

Trains each (model, norm) pair with optax AdamW under ``jit`` on a fixed stratified split of
``sklearn.datasets.load_digits`` (1,797 8×8 images; 1,347 train / 450 test), evaluates with
the running statistics, prints a table and writes ``results.json`` and ``curves.png`` into
``--out``. Then it folds the BatchNorm model's norms into its convolutions with
:func:`jaxnorm.fold_batch_norm`, checks the folded model predicts the same, and times both.

``--devices N`` shards every batch over N host devices with ``shard_map``; BatchNorm and
BatchRenorm get ``axis_name="data"``, so their statistics are those of the whole batch.
"""

# XLA_FLAGS must be set before JAX is imported, hence the imports after _request_host_devices.
from __future__ import annotations

import os
import sys


def _request_host_devices(argv: list[str]) -> None:
    """XLA creates ``--devices N`` host devices only if told before JAX starts."""
    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--devices=") else None
        if arg == "--devices" and index + 1 < len(argv):
            value = argv[index + 1]
        if value is not None and value.isdigit() and int(value) > 1:
            flag = f"--xla_force_host_platform_device_count={value}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


if __name__ == "__main__":
    _request_host_devices(sys.argv[1:])

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from models import MODELS, NORM_KINDS, build_model, fold_batch_norms
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

DATA_AXIS = "data"
UNOPTIMIZED = {"xla_backend_optimization_level": 0}
GHOST_BATCH_SIZE = 16  # ghost batch norm: examples per statistics group (at most per device)


@dataclass(frozen=True)
class Digits:
    """A fixed stratified split of the digits: images ``(N, 8, 8, 1)`` in [0, 1]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digit_split(test_size: float = 0.25, seed: int = 0) -> Digits:
    """``load_digits`` scaled to [0, 1] (pixels are 0..16), split by ``train_test_split``
    stratified on the label, so every run sees the same 1,347 / 450 images."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    return Digits(train_x, train_y, test_x, test_y)


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings shared by every run of a comparison."""

    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    devices: int = 1
    optimize_compiled: bool = True  # False: compile without XLA backend optimizations (CI)


@dataclass
class RunResult:
    """One trained (model, norm): final metrics, per-epoch curves and the variables."""

    model: str
    norm: str
    test_accuracy: float
    train_seconds: float
    compile_seconds: float
    train_loss: list[float] = field(default_factory=list)
    test_accuracy_curve: list[float] = field(default_factory=list)
    variables: dict[str, Any] = field(default_factory=dict, repr=False)

    def record(self) -> dict[str, Any]:
        """The ``results.json`` entry."""
        return {
            "model": self.model,
            "norm": self.norm,
            "test_accuracy": self.test_accuracy,
            "train_seconds": round(self.train_seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
        }


def data_mesh(devices: int) -> Mesh | None:
    """A 1-D mesh over the first ``devices`` devices, or ``None`` for one device."""
    if devices == 1:
        return None
    available = jax.devices()
    if devices > len(available):
        raise ValueError(
            f"--devices {devices} needs {devices} devices, JAX sees {len(available)}; "
            "set XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts"
        )
    return Mesh(np.array(available[:devices]), (DATA_AXIS,))


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh | None
) -> Callable[..., tuple[Any, Any, Any, jax.Array]]:
    """``(params, batch_stats, opt_state, images, labels) -> (params, batch_stats,
    opt_state, loss)``: one AdamW step on the mean softmax cross-entropy.

    With a mesh the batch is split over its devices (``shard_map``); gradients and loss
    are averaged over them and so are the running statistics (already equal for
    synchronized BatchNorm, per-device for ghost batch norm).
    """

    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates.get("batch_stats", {})

        if mesh is None:
            (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        else:
            # each device differentiates its own copy of the parameters (its local gradient)
            local_params = lax.pcast(params, DATA_AXIS, to="varying")
            (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                local_params
            )
            grads, loss, new_batch_stats = lax.pmean((grads, loss, new_batch_stats), DATA_AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_batch_stats, opt_state, loss

    if mesh is not None:
        replicated, sharded = P(), P(DATA_AXIS)
        step = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(replicated, replicated, replicated, sharded, sharded),
            out_specs=replicated,
        )
    return jax.jit(step, donate_argnums=(0, 1, 2))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of argmax predictions equal to the labels."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def train(
    model_name: str, norm: str, data: Digits, config: TrainConfig, *, progress: bool = True
) -> RunResult:
    """Trains ``model_name`` with normalization ``norm`` and evaluates it on the test set
    after every epoch with the running statistics (``train=False``)."""
    mesh = data_mesh(config.devices)
    if config.batch_size % config.devices:
        raise ValueError(f"--batch-size {config.batch_size} must divide over {config.devices}")
    local_batch_size = config.batch_size // config.devices
    model = build_model(
        model_name,
        norm,
        axis_name=None if mesh is None else DATA_AXIS,
        virtual_batch_size=min(GHOST_BATCH_SIZE, local_batch_size),
    )
    steps_per_epoch = len(data.train_images) // config.batch_size
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch)
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)

    def initialize(seed: jax.Array, images: jax.Array) -> tuple[Any, Any, Any]:
        variables = model.init(jax.random.key(seed), images, train=False)
        return variables["params"], variables.get("batch_stats", {}), optimizer.init(
            variables["params"]
        )

    # Initialization runs once: compiling it without XLA's backend optimizations saves
    # seconds per model (its random number generation is slow to optimize on CPU).
    sample = data.train_images[: config.batch_size]
    params, batch_stats, opt_state = (
        jax.jit(initialize).lower(config.seed, sample).compile(UNOPTIMIZED)(config.seed, sample)
    )
    if mesh is not None:
        params, batch_stats, opt_state = jax.device_put(
            (params, batch_stats, opt_state), NamedSharding(mesh, P())
        )
    variables = {"params": params, "batch_stats": batch_stats}

    started = time.perf_counter()
    compiler_options = None if config.optimize_compiled else UNOPTIMIZED
    batch_shape = (config.batch_size, *data.train_images.shape[1:])
    train_step = make_train_step(model, optimizer, mesh).lower(
        params,
        batch_stats,
        opt_state,
        jax.ShapeDtypeStruct(batch_shape, jnp.float32),
        jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
    ).compile(compiler_options)
    evaluate = (
        jax.jit(lambda variables, images: model.apply(variables, images, train=False))
        .lower(variables, data.test_images)
        .compile(compiler_options)
    )
    compile_seconds = time.perf_counter() - started

    shuffler = np.random.default_rng(config.seed)
    result = RunResult(model_name, norm, 0.0, 0.0, compile_seconds)
    epochs = tqdm(range(config.epochs), desc=f"{model_name}/{norm}", disable=not progress)
    for _ in epochs:
        order = shuffler.permutation(len(data.train_images))[: steps_per_epoch * config.batch_size]
        images = data.train_images[order].reshape(steps_per_epoch, *batch_shape)
        labels = data.train_labels[order].reshape(steps_per_epoch, config.batch_size)
        started = time.perf_counter()
        losses = []
        for step in range(steps_per_epoch):
            params, batch_stats, opt_state, loss = train_step(
                params, batch_stats, opt_state, images[step], labels[step]
            )
            losses.append(loss)
        result.train_loss.append(float(np.mean(jax.device_get(losses))))
        result.train_seconds += time.perf_counter() - started
        result.variables = {"params": params, "batch_stats": batch_stats}
        logits = np.asarray(evaluate(result.variables, data.test_images))
        result.test_accuracy_curve.append(accuracy(logits, data.test_labels))
        epochs.set_postfix(
            loss=f"{result.train_loss[-1]:.3f}", test_acc=f"{result.test_accuracy_curve[-1]:.3f}"
        )
    result.test_accuracy = result.test_accuracy_curve[-1]
    print(
        f"{model_name}/{norm}: test accuracy {100 * result.test_accuracy:.1f}% "
        f"(train {result.train_seconds:.1f} s, compile {compile_seconds:.1f} s)",
        flush=True,
    )
    return result


@dataclass(frozen=True)
class FoldReport:
    """How the BatchNorm-folded model compares with the original at inference."""

    same_predictions: bool
    max_logit_difference: float
    batch_norm_seconds: float
    folded_seconds: float

    @property
    def speedup(self) -> float:
        return self.batch_norm_seconds / self.folded_seconds


def median_seconds(functions: Sequence[Callable[[], jax.Array]], repeats: int) -> list[float]:
    """Median wall time of each ``function()`` over ``repeats`` calls, after a warm-up; the
    functions take turns, so a busy machine slows them alike."""
    for function in functions:
        function().block_until_ready()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, recorded in zip(functions, times, strict=True):
            started = time.perf_counter()
            function().block_until_ready()
            recorded.append(time.perf_counter() - started)
    return [statistics.median(recorded) for recorded in times]


def fold_and_compare(
    model_name: str, variables: dict[str, Any], images: np.ndarray, *, repeats: int = 50
) -> FoldReport:
    """Folds every conv → BatchNorm of the trained ``model_name`` into the conv and checks
    the folded model (``norm=None``) predicts the same; times jitted inference of both."""
    model, folded_model = build_model(model_name, "batch"), build_model(model_name, "none")
    folded = jax.jit(fold_batch_norms)(variables)
    expected = jax.eval_shape(
        lambda: folded_model.init(jax.random.key(0), images[:1], train=False)
    )
    if jax.tree.structure(expected) != jax.tree.structure(folded):
        raise ValueError(f"{model_name} has norms that do not follow a conv; cannot fold")
    images = jnp.asarray(images)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    apply_folded = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))
    logits = np.asarray(apply(variables, images))
    folded_logits = np.asarray(apply_folded(folded, images))
    batch_norm_seconds, folded_seconds = median_seconds(
        [lambda: apply(variables, images), lambda: apply_folded(folded, images)], repeats
    )
    return FoldReport(
        same_predictions=bool(np.array_equal(logits.argmax(-1), folded_logits.argmax(-1))),
        max_logit_difference=float(np.max(np.abs(logits - folded_logits))),
        batch_norm_seconds=batch_norm_seconds,
        folded_seconds=folded_seconds,
    )


def plot_curves(results: Sequence[RunResult], path: Path) -> None:
    """Training loss and test accuracy per epoch, one line per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        epochs = np.arange(1, len(result.train_loss) + 1)
        label = f"{result.model}/{result.norm}"
        loss_axes.plot(epochs, result.train_loss, marker=".", label=label)
        accuracy_axes.plot(epochs, result.test_accuracy_curve, marker=".", label=label)
    loss_axes.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    accuracy_axes.legend(loc="lower right", fontsize="small")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_table(results: Sequence[RunResult]) -> str:
    """The comparison as a plain-text table."""
    lines = [f"{'model':<10}{'norm':<14}{'test acc':>10}{'train s':>10}{'compile s':>11}"]
    for r in results:
        lines.append(
            f"{r.model:<10}{r.norm:<14}{100 * r.test_accuracy:>9.1f}%"
            f"{r.train_seconds:>10.1f}{r.compile_seconds:>11.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="resnet")
    parser.add_argument("--norms", nargs="+", choices=NORM_KINDS, default=None,
                        help="normalizations to compare (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="default 12, 1 with --quick")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--devices", type=int, default=1,
                        help="train data-parallel over this many host devices")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: 1 epoch, norms none and batch unless given, "
                        "unoptimized XLA compiles")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the comparison and the folding check; returns the ``results.json`` entries."""
    args = parse_args(argv)
    norms = args.norms or (["none", "batch"] if args.quick else list(NORM_KINDS))
    config = TrainConfig(
        epochs=args.epochs or (1 if args.quick else TrainConfig.epochs),
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        devices=args.devices,
        optimize_compiled=not args.quick,
    )
    data = load_digit_split()
    print(
        f"digits: {len(data.train_images)} train / {len(data.test_images)} test, "
        f"{args.model}, {config.epochs} epochs, {config.devices} {jax.devices()[0].platform} "
        "device(s)"
    )
    progress = not args.no_progress and sys.stderr.isatty()
    results = [train(args.model, norm, data, config, progress=progress) for norm in norms]

    args.out.mkdir(parents=True, exist_ok=True)
    records = [result.record() for result in results]
    (args.out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    plot_curves(results, args.out / "curves.png")
    print("\n" + format_table(results))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'curves.png'}")

    batch_norm_runs = [r for r in results if r.norm == "batch"]
    if batch_norm_runs and args.model != "densenet":
        report = fold_and_compare(
            args.model, batch_norm_runs[0].variables, data.test_images,
            repeats=5 if args.quick else 50,
        )
        if not report.same_predictions:
            raise RuntimeError(f"folded model predicts differently: {report}")
        print(
            f"\nfolded BatchNorm into the convolutions: same predictions on all "
            f"{len(data.test_images)} test images, max |logit difference| "
            f"{report.max_logit_difference:.1e}\ninference on the test set: "
            f"{1e3 * report.batch_norm_seconds:.2f} ms with BatchNorm, "
            f"{1e3 * report.folded_seconds:.2f} ms folded ({report.speedup:.2f}× speed-up)"
        )
    elif args.model == "densenet":
        print("\nDenseNet normalizes before its convolutions (pre-activation): nothing to fold")
    return records


if __name__ == "__main__":
    main()

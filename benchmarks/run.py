"""jaxnorm against flax.linen on the CPU: time, bandwidth and peak memory of normalization layers.

**CPU-only, host wall-clock timings.** Every time here is ``time.perf_counter`` around one
call and its ``block_until_ready``, measured on the host. On a CPU that is the work itself;
on a GPU it is mostly host dispatch (about 100 µs a call, longer than most of these
kernels), so every ratio comes out near 1: GPU timings come from ``gpu_timing.sh``
(``gpu_bench.py``: device time from a profiler trace), never from this script.

The shapes come from the shared sweep (``sweep.py``: ResNet-50, Stable Diffusion, style
transfer, LLM and ViT activations); ``--quick`` times its CPU subset, the sweep's cases
with the batch or token axis scaled down to at most 4 Mi elements.

Normalization is memory-bound, so its floor is the bytes it must move. For every layer ×
shape × dtype, forward and forward+backward (gradients with respect to the input and the
parameters) are jitted, warmed up and timed interleaved with Flax's default layer in the
same process; the table gives the median milliseconds, the ratio jaxnorm/Flax (the median
over back-to-back pairs of calls; below 1: jaxnorm is faster) and the bandwidth by the
minimal-bytes model:

- forward: LayerNorm-like layers read ``x`` and write ``y`` (2 passes); BatchNorm's
  statistics span the whole batch, which does not stay in cache, so it reads ``x`` twice
  (3 passes);
- backward: LayerNorm-like layers read ``x`` and ``dy`` and write ``dx`` (3 passes);
  BatchNorm reads ``x`` and ``dy`` once for its two reductions and again for ``dx`` (5);
  forward+backward is the sum.

Usage::

    python benchmarks/run.py --quick --json          # CPU subset, writes benchmarks/results.json
    python benchmarks/run.py                          # the whole sweep, full size (slow on a CPU)
    python benchmarks/run.py --torch                  # also PyTorch eager / torch.compile (CUDA)

Both implementations use the same epsilon (Flax's defaults), so they compute the same
function; jaxnorm uses its default stable variance, Flax its default fast one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402  (benchmarks/sweep.py: the shared shape sweep)

import jaxnorm

Params = dict[str, jax.Array]
Apply = Callable[[jax.Array, Params], jax.Array]

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"
BATCH_NORM_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class Layer:
    """One normalization, as jaxnorm and as Flax compute it, with the same parameters."""

    name: str
    jaxnorm_apply: Callable[[jax.Array, Params], Any]
    flax_module: Callable[[Any], nn.Module]
    param_names: tuple[str, ...]
    forward_passes: int
    backward_passes: int
    mutable: tuple[str, ...] = ()


def _batch_norm(x: jax.Array, params: Params) -> tuple[jax.Array, Params]:
    """Training-mode BatchNorm with the running-average update Flax's module also does."""
    y, mean, var = jaxnorm.batch_norm(x, params["scale"], params["bias"], eps=1e-5, dtype=x.dtype)
    channels = x.shape[-1]
    decay = BATCH_NORM_MOMENTUM
    running = {
        "mean": decay * jnp.zeros((channels,), jnp.float32) + (1 - decay) * mean,
        "var": decay * jnp.ones((channels,), jnp.float32) + (1 - decay) * var,
    }
    return y, running


LAYERS: dict[str, Layer] = {
    layer.name: layer
    for layer in (
        Layer(
            "LayerNorm",
            lambda x, p: jaxnorm.layer_norm(x, p["scale"], p["bias"], eps=1e-6, dtype=x.dtype),
            lambda dtype: nn.LayerNorm(epsilon=1e-6, dtype=dtype),
            ("scale", "bias"),
            2,
            3,
        ),
        Layer(
            "RMSNorm",
            lambda x, p: jaxnorm.rms_norm(x, p["scale"], eps=1e-6, dtype=x.dtype),
            lambda dtype: nn.RMSNorm(epsilon=1e-6, dtype=dtype),
            ("scale",),
            2,
            3,
        ),
        Layer(
            "BatchNorm",
            _batch_norm,
            lambda dtype: nn.BatchNorm(use_running_average=False, epsilon=1e-5, dtype=dtype),
            ("scale", "bias"),
            3,
            5,
            mutable=("batch_stats",),
        ),
        Layer(
            "GroupNorm",
            lambda x, p: jaxnorm.group_norm(
                x, p["scale"], p["bias"], num_groups=32, eps=1e-6, dtype=x.dtype
            ),
            lambda dtype: nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype),
            ("scale", "bias"),
            2,
            3,
        ),
        Layer(
            "InstanceNorm",
            lambda x, p: jaxnorm.instance_norm(x, p["scale"], p["bias"], eps=1e-6, dtype=x.dtype),
            lambda dtype: nn.InstanceNorm(epsilon=1e-6, dtype=dtype),
            ("scale", "bias"),
            2,
            3,
        ),
    )
}

# The whole sweep, as (layer, shape, parameter dtype).
FULL_CASES: tuple[sweep.Case, ...] = sweep.SWEEP

# The CPU subset: sweep cases scaled down to at most 4 Mi elements (``sweep.cpu_subset``).
QUICK_CASES: tuple[tuple[str, tuple[int, ...]], ...] = tuple(
    (case.layer, case.shape) for case in sweep.cpu_subset()
)

TIMING_NOTE = (
    "CPU-only benchmark: host wall-clock (perf_counter around each call and its "
    "block_until_ready); on a GPU this measures dispatch, use benchmarks/gpu_timing.sh"
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------------------
# The functions timed


def jaxnorm_output(layer: Layer) -> Apply:
    """``x, params -> y`` for jaxnorm (BatchNorm's running statistics kept as outputs)."""
    return layer.jaxnorm_apply


def flax_output(layer: Layer) -> Apply:
    """``x, params -> y`` for the Flax module (running statistics returned as well)."""

    def apply(x: jax.Array, params: Params) -> Any:
        module = layer.flax_module(x.dtype)
        if layer.mutable:
            return module.apply({"params": params}, x, mutable=list(layer.mutable))
        return module.apply({"params": params}, x)

    return apply


def forward_and_backward(apply: Apply, has_aux: bool) -> Callable[..., Any]:
    """``x, params, dy -> (y, dx, dparams)``: the forward pass and its vector-Jacobian
    product with ``dy`` (the gradient with respect to the input and the parameters)."""

    def run(x: jax.Array, params: Params, dy: jax.Array) -> Any:
        if has_aux:
            y, pullback, aux = jax.vjp(apply, x, params, has_aux=True)
        else:
            y, pullback = jax.vjp(apply, x, params)
            aux = None
        dx, dparams = pullback(dy)
        return y, dx, dparams, aux

    return run


def make_inputs(
    layer: Layer, shape: tuple[int, ...], dtype: Any, seed: int = 0, param_dtype: Any = None
) -> tuple[jax.Array, Params, jax.Array]:
    """Input (mean 3, std 2: not centred, as real activations), parameters (float32 unless
    ``param_dtype``), cotangent."""
    keys = jax.random.split(jax.random.key(seed), 4)
    x = (3 + 2 * jax.random.normal(keys[0], shape, jnp.float32)).astype(dtype)
    channels = shape[-1]
    params = {
        "scale": 1 + 0.1 * jax.random.normal(keys[1], (channels,), jnp.float32),
        "bias": 0.1 * jax.random.normal(keys[2], (channels,), jnp.float32),
    }
    params = {name: params[name].astype(param_dtype or jnp.float32) for name in layer.param_names}
    dy = jax.random.normal(keys[3], shape, jnp.float32).astype(dtype)
    return x, params, dy


def compiled_pair(
    layer: Layer, pass_name: str, x: jax.Array, params: Params, dy: jax.Array
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Zero-argument callables running the jitted jaxnorm and Flax functions."""
    calls = []
    for apply in (jaxnorm_output(layer), flax_output(layer)):
        if pass_name == "forward":
            fn = jax.jit(apply)
            calls.append(lambda fn=fn: fn(x, params))
        else:
            has_aux = bool(layer.mutable)
            if has_aux:
                unwrapped = apply
                apply = lambda x_, p_, unwrapped=unwrapped: tuple(unwrapped(x_, p_))
            fn = jax.jit(forward_and_backward(apply, has_aux))
            calls.append(lambda fn=fn: fn(x, params, dy))
    return calls[0], calls[1]


def time_interleaved(
    first: Callable[[], Any], second: Callable[[], Any], repeats: int, warmup: int = 3
) -> tuple[list[float], list[float]]:
    """Seconds per call of each, alternating which goes first, after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(first())
        jax.block_until_ready(second())
    times: tuple[list[float], list[float]] = ([], [])
    order = ((0, first), (1, second))
    for rep in range(repeats):
        for index, call in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[index].append(time.perf_counter() - start)
    return times


def minimal_bytes(layer: Layer, shape: tuple[int, ...], dtype: Any, pass_name: str) -> int:
    """Bytes the pass must move at least: passes over an ``x``-sized array × its size."""
    passes = layer.forward_passes
    if pass_name == "forward+backward":
        passes += layer.backward_passes
    return passes * math.prod(shape) * jnp.dtype(dtype).itemsize


def repeats_for(seconds_per_call: float, budget_seconds: float, least: int, most: int) -> int:
    """As many interleaved repetitions as fit ``budget_seconds``, within ``[least, most]``."""
    return int(min(most, max(least, budget_seconds / max(2 * seconds_per_call, 1e-6))))


def benchmark_case(
    layer_name: str,
    shape: tuple[int, ...],
    dtype_name: str,
    pass_name: str,
    budget_seconds: float,
    least_repeats: int,
    param_dtype_name: str = "float32",
) -> dict[str, Any]:
    """Times one case (host wall clock); returns its JSON record."""
    layer = LAYERS[layer_name]
    dtype = DTYPES[dtype_name]
    x, params, dy = make_inputs(layer, shape, dtype, param_dtype=DTYPES[param_dtype_name])
    ours, theirs = compiled_pair(layer, pass_name, x, params, dy)
    probe = time_interleaved(ours, theirs, repeats=2, warmup=2)
    per_call = statistics.median(probe[0] + probe[1])
    repeats = repeats_for(per_call, budget_seconds, least_repeats, 2000)
    ours_s, theirs_s = time_interleaved(ours, theirs, repeats, warmup=0)
    ours_ms = 1e3 * statistics.median(ours_s)
    theirs_ms = 1e3 * statistics.median(theirs_s)
    # each pair ran back to back, so its ratio cancels load that drifts during the run
    paired = statistics.median(a / b for a, b in zip(ours_s, theirs_s, strict=True))
    gigabytes = minimal_bytes(layer, shape, dtype, pass_name) / 1e9
    return {
        "layer": layer_name,
        "shape": list(shape),
        "dtype": dtype_name,
        "pass": pass_name,
        "jaxnorm_ms": round(ours_ms, 4),
        "flax_ms": round(theirs_ms, 4),
        "ratio": round(paired, 4),
        "ratio_of_medians": round(ours_ms / theirs_ms, 4),
        "jaxnorm_gbps": round(gigabytes / (ours_ms / 1e3), 2),
        "flax_gbps": round(gigabytes / (theirs_ms / 1e3), 2),
        "repeats": repeats,
        **({"param_dtype": param_dtype_name} if param_dtype_name != "float32" else {}),
    }


# --------------------------------------------------------------------------------------
# Peak memory of a ResNet training step


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block (He et al. 2016), with a pluggable BatchNorm class."""

    features: int
    strides: int
    norm: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda: self.norm(use_running_average=not train)
        residual = x
        y = nn.relu(norm()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
        y = nn.Conv(self.features, (3, 3), (self.strides,) * 2, use_bias=False)(y)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(4 * self.features, (1, 1), use_bias=False)(y))
        if residual.shape != y.shape:
            residual = nn.Conv(4 * self.features, (1, 1), (self.strides,) * 2, use_bias=False)(x)
            residual = norm()(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """A ResNet of bottleneck blocks; ``stages=(3, 4, 6, 3)`` is ResNet-50."""

    stages: Sequence[int]
    norm: Any
    width: int = 64
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(self.width, (7, 7), (2, 2), use_bias=False)(x)
        x = nn.relu(self.norm(use_running_average=not train)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stages):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(self.width * 2**stage, strides, self.norm)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def training_step_memory(
    norm: Any, stages: Sequence[int], batch: int, image: int, dtype: Any
) -> dict[str, int]:
    """Compiled memory of one SGD step (forward, backward, update of parameters and running
    statistics) of a ResNet whose BatchNorm is ``norm``."""
    model = ResNet(stages, functools.partial(norm, momentum=0.9, dtype=dtype))
    images = jnp.zeros((batch, image, image, 3), dtype)
    labels = jnp.zeros((batch,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))

    def step(variables: Any, images: jax.Array, labels: jax.Array) -> Any:
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            logits, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                mutable=["batch_stats"],
            )
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
            loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
            return loss, updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {"params": params, "batch_stats": updates["batch_stats"]}

    stats = jax.jit(step, donate_argnums=0).lower(variables, images, labels).compile()
    memory = stats.memory_analysis()
    return {
        "peak_bytes": int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
    }


def memory_comparison(quick: bool) -> list[dict[str, Any]]:
    """Peak and temporary memory of a ResNet training step, jaxnorm.linen vs flax.linen."""
    import jaxnorm.linen

    if quick:
        configs = [("ResNet-14 (1,1,1,1), 16×96×96", (1, 1, 1, 1), 16, 96)]
    else:
        configs = [("ResNet-50, 32×224×224", (3, 4, 6, 3), 32, 224)]
    records = []
    for name, stages, batch, image in configs:
        for dtype_name in ("float32",) if quick else ("float32", "bfloat16"):
            dtype = DTYPES[dtype_name]
            ours = training_step_memory(jaxnorm.linen.BatchNorm, stages, batch, image, dtype)
            theirs = training_step_memory(nn.BatchNorm, stages, batch, image, dtype)
            records.append(
                {
                    "model": name,
                    "dtype": dtype_name,
                    "jaxnorm": ours,
                    "flax": theirs,
                    "temp_ratio": round(ours["temp_bytes"] / max(theirs["temp_bytes"], 1), 4),
                }
            )
    return records


# --------------------------------------------------------------------------------------
# PyTorch baselines (on a GPU only: on CPU they measure PyTorch's CPU kernels, not the
# alternative a JAX user has)


def torch_times(layer_name: str, shape: tuple[int, ...], dtype_name: str, repeats: int) -> dict:
    """Median milliseconds of PyTorch eager and ``torch.compile`` for one case, CUDA only."""
    import torch

    device = "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    channels = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype).mul_(2).add_(3)
    if layer_name == "LayerNorm":
        module = torch.nn.LayerNorm(channels, eps=1e-6)
    elif layer_name == "RMSNorm":
        module = torch.nn.RMSNorm(channels, eps=1e-6)
    else:
        x = x.movedim(-1, 1).contiguous(memory_format=torch.channels_last)
        module = {
            "BatchNorm": lambda: torch.nn.BatchNorm2d(channels, eps=1e-5),
            "GroupNorm": lambda: torch.nn.GroupNorm(32, channels, eps=1e-6),
            "InstanceNorm": lambda: torch.nn.InstanceNorm2d(channels, eps=1e-6, affine=True),
        }[layer_name]()
    module = module.to(device=device, dtype=dtype)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    results = {}
    for name, fn in (("torch_eager", module), ("torch_compile", torch.compile(module))):
        for pass_name in ("forward", "forward+backward"):

            def call(fn: Any = fn, pass_name: str = pass_name) -> None:
                if pass_name == "forward":
                    with torch.no_grad():
                        fn(x)
                else:
                    fn(x).backward(dy)

            for _ in range(5):
                call()
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results[(name, pass_name)] = 1e3 * statistics.median(times)
    return results


# --------------------------------------------------------------------------------------
# Report


def environment() -> dict[str, str]:
    """Machine, device and versions, for the record."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "device": f"{device.platform}: {getattr(device, 'device_kind', device)} "
        f"× {jax.device_count()}",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "jaxnorm": jaxnorm.__version__,
        "timing": TIMING_NOTE,
    }


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the timing records."""
    extra = [k for k in ("torch_eager_ms", "torch_compile_ms") if any(k in r for r in records)]
    header = [
        "layer",
        "shape",
        "dtype",
        "pass",
        "jaxnorm ms",
        "flax ms",
        "ratio",
        "jaxnorm GB/s",
        "flax GB/s",
    ] + [k.replace("_ms", " ms") for k in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        row = [
            r["layer"],
            "×".join(map(str, r["shape"])),
            r["dtype"],
            r["pass"],
            f"{r['jaxnorm_ms']:.3f}",
            f"{r['flax_ms']:.3f}",
            f"{r['ratio']:.3f}",
            f"{r['jaxnorm_gbps']:.1f}",
            f"{r['flax_gbps']:.1f}",
        ]
        row += [f"{r[k]:.3f}" if k in r else "" for k in extra]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Geometric-mean and worst ratio, overall and per pass."""
    summary: dict[str, Any] = {
        "geomean_ratio": round(geometric_mean([r["ratio"] for r in records]), 4),
        "max_ratio": max(r["ratio"] for r in records),
    }
    for pass_name in ("forward", "forward+backward"):
        ratios = [r["ratio"] for r in records if r["pass"] == pass_name]
        if ratios:
            summary[f"geomean_ratio_{pass_name}"] = round(geometric_mean(ratios), 4)
    return summary


def format_memory(records: Sequence[dict[str, Any]]) -> str:
    header = [
        "model",
        "dtype",
        "jaxnorm temp MiB",
        "flax temp MiB",
        "ratio",
        "jaxnorm peak MiB",
        "flax peak MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    mib = 2.0**20
    for r in records:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    r["dtype"],
                    f"{r['jaxnorm']['temp_bytes'] / mib:.1f}",
                    f"{r['flax']['temp_bytes'] / mib:.1f}",
                    f"{r['temp_ratio']:.3f}",
                    f"{r['jaxnorm']['peak_bytes'] / mib:.1f}",
                    f"{r['flax']['peak_bytes'] / mib:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the CPU subset of the sweep (scaled-down sweep shapes)")
    parser.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_JSON),
        default=None,
        metavar="FILE",
        help=f"write the records as JSON (default file: {DEFAULT_JSON.name} beside this script)",
    )
    parser.add_argument("--layers", nargs="*", default=None, help="only these layers")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="timing budget per case and pass (default: 1.5 with --quick, 3 otherwise)",
    )
    parser.add_argument("--min-repeats", type=int, default=30)
    parser.add_argument("--no-memory", action="store_true", help="skip the ResNet memory step")
    parser.add_argument("--no-weight-norms", action="store_true",
                        help="skip the WeightNorm / SpectralNorm comparison")
    parser.add_argument("--torch", action="store_true", help="PyTorch baselines (CUDA only)")
    parser.add_argument(
        "--shapes",
        default=None,
        help="override: LAYER:AxBxC[,LAYER:...] (the smoke test uses tiny shapes)",
    )
    args = parser.parse_args(argv)

    cases = sweep.cpu_subset() if args.quick else FULL_CASES
    if args.shapes:
        cases = tuple(
            sweep.Case(item.split(":")[0], tuple(int(d) for d in item.split(":")[1].split("x")),
                       "--shapes")
            for item in args.shapes.split(",")
        )
    if args.layers:
        cases = tuple(c for c in cases if c.layer in args.layers)
    seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 3.0)
    use_torch = args.torch and _cuda_available()

    env = environment()
    print(" · ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    if jax.default_backend() != "cpu":
        print(f"WARNING: backend {jax.default_backend()}: {TIMING_NOTE}", flush=True)
    records = []
    for case, dtype_name in sweep.with_dtypes(cases, args.dtypes):
        layer_name, shape = case.layer, case.shape
        param_dtype_name = case.param_dtype_for(dtype_name)
        torch_ms = torch_times(layer_name, shape, dtype_name, 100) if use_torch else {}
        for pass_name in ("forward", "forward+backward"):
            record = benchmark_case(
                layer_name, shape, dtype_name, pass_name, seconds, args.min_repeats,
                param_dtype_name,
            )
            for (name, torch_pass), ms in torch_ms.items():
                if torch_pass == pass_name:
                    record[f"{name}_ms"] = round(ms, 4)
            records.append(record)
            print(
                f"{case.label(dtype_name):44s} {pass_name:16s} "
                f"ours {record['jaxnorm_ms']:9.3f} ms  flax {record['flax_ms']:9.3f} ms  "
                f"ratio {record['ratio']:.3f}",
                flush=True,
            )
    summary = summarize(records)
    print()
    print(format_table(records))
    print()
    print(" · ".join(f"{k}: {v}" for k, v in summary.items()))
    memory = []
    if not args.no_memory:
        memory = memory_comparison(args.quick)
        print()
        print(format_memory(memory))
    weight_norms = []
    if not args.no_weight_norms:
        weight_norms = weight_norm_comparison(args.quick, seconds)
        print()
        print(format_weight_norms(weight_norms))
    result = {"environment": env, "summary": summary, "records": records, "memory": memory,
              "weight_norms": weight_norms}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path}")
    return result


# --------------------------------------------------------------------------------------
# Weight-side normalizations: a Dense layer wrapped by WeightNorm / SpectralNorm


def _weight_wrapper_pair(name: str, features: int) -> tuple[nn.Module, nn.Module, bool]:
    """``(jaxnorm module, Flax module, spectral)`` wrapping the same ``nn.Dense``."""
    from jaxnorm import linen as jnn

    if name == "WeightNorm":
        return jnn.WeightNorm(nn.Dense(features)), nn.WeightNorm(nn.Dense(features)), False
    return (jnn.SpectralNorm(nn.Dense(features)), nn.SpectralNorm(nn.Dense(features)), True)


def weight_norm_comparison(quick: bool, seconds: float) -> list[dict[str, Any]]:
    """Times jaxnorm.linen's WeightNorm / SpectralNorm (power iteration in training) against
    flax.linen's around the same Dense, forward and forward+backward (input and params)."""
    batch, features = (256, 1024) if quick else (4096, 4096)
    x = jax.random.normal(jax.random.key(1), (batch, features))
    records = []
    for name in ("WeightNorm", "SpectralNorm"):
        ours, theirs, spectral = _weight_wrapper_pair(name, features)
        kwargs = {"update_stats": True, "mutable": ["batch_stats"]} if spectral else {}
        init_kwargs = {"update_stats": False} if spectral else {}
        variables = theirs.init(jax.random.key(0), x, **init_kwargs)

        def output(module: nn.Module, spectral: bool = spectral,
                   kwargs: dict[str, Any] = kwargs) -> Callable[..., Any]:
            def call(inputs: jax.Array, tree: Any) -> jax.Array:
                y = module.apply(tree, inputs, **kwargs)
                return y[0] if spectral else y
            return call

        for pass_name in ("forward", "forward+backward"):
            calls = []
            for apply in (output(ours), output(theirs)):
                if pass_name == "forward":
                    fn = jax.jit(apply)
                else:
                    fn = jax.jit(jax.grad(lambda x, v, apply=apply: jnp.sum(apply(x, v) ** 2),
                                          argnums=(0, 1)))
                calls.append(lambda fn=fn, variables=variables: fn(x, variables))
            probe = time_interleaved(*calls, repeats=2, warmup=2)
            repeats = repeats_for(statistics.median(probe[0] + probe[1]), seconds, 20, 500)
            ours_s, theirs_s = time_interleaved(*calls, repeats, warmup=0)
            records.append({
                "layer": f"{name}(Dense {features})", "shape": [batch, features],
                "pass": pass_name,
                "jaxnorm_ms": round(1e3 * statistics.median(ours_s), 4),
                "flax_ms": round(1e3 * statistics.median(theirs_s), 4),
                "ratio": round(statistics.median(
                    a / b for a, b in zip(ours_s, theirs_s, strict=True)), 4),
            })
    return records


def format_weight_norms(records: Sequence[dict[str, Any]]) -> str:
    """The weight-side comparison as a markdown table."""
    lines = ["| layer | input | pass | jaxnorm ms | flax ms | ratio |", "|---|---|---|---|---|---|"]
    for r in records:
        shape = "×".join(str(d) for d in r["shape"])
        lines.append(f"| {r['layer']} | {shape} | {r['pass']} | {r['jaxnorm_ms']:.3f} | "
                     f"{r['flax_ms']:.3f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()

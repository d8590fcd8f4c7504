"""Compare normalizations in sequence models on real text: the Python standard library's source.

    python examples/train_text.py                    # 6 models, about 3 min on 2 CPUs
    python examples/train_text.py --model lstm --steps 600 --seq-len 32
    python examples/train_text.py --quick            # CI smoke run, tiny models

A character-level language model on a fixed list of the standard library's own modules
(found with ``sysconfig``, so nothing is downloaded), split by file into train and
validation. Six models, trained alike with optax AdamW under ``jit`` on random windows of
``--seq-len`` T characters:

- ``lstm`` with no norm, LayerNorm inside the cell (Ba et al. 2016), or batch norm with
  separate statistics per time step (Cooijmans et al. 2016); each is evaluated on
  validation sequences of length T, 2T and 4T. Beyond step T the per-step batch norm reuses
  the statistics of step T - 1, the last it was trained on.
- ``transformer`` (decoder-only), pre-norm LayerNorm, pre-norm RMSNorm or post-norm
  LayerNorm, evaluated on length T (its learned positions stop there).

It prints a table (validation bits per character, training tokens per second, compile
time) and writes ``text_results.json`` and ``text_curves.png`` into ``--out``. The unigram
baseline is the cross-entropy of the train split's character frequencies on validation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from text_models import (
    LSTM_NORMS,
    TRANSFORMER_NORMS,
    CharLSTM,
    CharTransformer,
    statistics_for_length,
)
from tqdm import tqdm
from train_digits import UNOPTIMIZED, make_train_step

# Top-level pure-Python modules present in every CPython 3.11+ (none became a package or
# was removed through 3.14), split by file: the validation files are never trained on.
TRAIN_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "codecs", "colorsys", "contextlib", "copy",
    "csv", "dataclasses", "difflib", "enum", "fnmatch", "functools", "gettext", "glob",
    "heapq", "hmac", "inspect", "ipaddress", "keyword", "linecache", "numbers", "operator",
    "optparse", "os", "pprint", "random", "reprlib", "sched", "secrets", "selectors",
    "shutil", "string", "tempfile", "threading", "timeit", "tokenize", "traceback", "types",
    "typing", "warnings",
)
VALIDATION_MODULES = (
    "calendar", "fractions", "queue", "shlex", "statistics", "textwrap", "uuid", "weakref",
)
# Tab, newline and printable ASCII; anything else (rare in the stdlib) is one extra id.
VOCABULARY = "\t\n" + "".join(chr(code) for code in range(32, 127))
OTHER = len(VOCABULARY)
VOCAB_SIZE = len(VOCABULARY) + 1
LN2 = math.log(2.0)


@dataclass(frozen=True)
class Corpus:
    """Token ids of the train and validation files (each file's text, concatenated)."""

    train: np.ndarray
    validation: np.ndarray
    description: dict[str, Any]


def encode(text: str) -> np.ndarray:
    """Characters → int32 ids: their index in :data:`VOCABULARY`, others :data:`OTHER`."""
    lookup = np.full(0x110000, OTHER, np.int32)
    lookup[[ord(c) for c in VOCABULARY]] = np.arange(len(VOCABULARY), dtype=np.int32)
    return lookup[np.frombuffer(text.encode("utf-32-le"), np.uint32)]


def load_stdlib_corpus(stdlib: Path | None = None) -> Corpus:
    """The :data:`TRAIN_MODULES` and :data:`VALIDATION_MODULES` sources of this Python.

    Args:
      stdlib: the directory holding the modules; default ``sysconfig``'s ``stdlib`` path.

    Returns:
      The corpus, described by its file names, a SHA-256 of the file list (the same on
      every install), a SHA-256 of the texts (this Python's versions of the files) and the
      character counts.
    """
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    texts: dict[str, str] = {}
    for module in TRAIN_MODULES + VALIDATION_MODULES:
        path = stdlib / f"{module}.py"
        if not path.is_file():
            raise FileNotFoundError(f"stdlib module {module!r} not found at {path}")
        texts[module] = path.read_text(encoding="utf-8")
    file_list = {"train": list(TRAIN_MODULES), "validation": list(VALIDATION_MODULES)}
    train_text = "".join(texts[m] for m in TRAIN_MODULES)
    validation_text = "".join(texts[m] for m in VALIDATION_MODULES)
    train, validation = encode(train_text), encode(validation_text)
    description = {
        "source": str(stdlib),
        "python": platform.python_version(),
        "train_files": [f"{m}.py" for m in TRAIN_MODULES],
        "validation_files": [f"{m}.py" for m in VALIDATION_MODULES],
        "file_list_sha256": _sha256(json.dumps(file_list, sort_keys=True)),
        "content_sha256": _sha256(train_text + "\0" + validation_text),
        "train_chars": len(train),
        "validation_chars": len(validation),
        "total_chars": len(train) + len(validation),
        "vocab_size": VOCAB_SIZE,
        "other_chars": int(np.sum(train == OTHER) + np.sum(validation == OTHER)),
    }
    return Corpus(train, validation, description)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unigram_bits_per_char(train: np.ndarray, validation: np.ndarray) -> float:
    r"""The unigram baseline :math:`-\frac1n\sum_i \log_2 p(v_i)` over the validation
    characters :math:`v_i`, with :math:`p` the train split's character frequencies
    (add-one smoothed over the vocabulary, so an unseen character costs finite bits).

    Args:
      train: train token ids.
      validation: validation token ids.
    """
    counts = np.bincount(train, minlength=VOCAB_SIZE) + 1.0
    log_probabilities = np.log2(counts / counts.sum())
    return float(-np.mean(log_probabilities[validation]))


@dataclass(frozen=True)
class TextConfig:
    """Model sizes and optimization settings shared by every run of a comparison."""

    steps: int = 400
    seq_len: int = 64
    batch_size: int = 32
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    eval_every: int = 50
    validation_chars: int = 16384  # scored characters per evaluation, at every length
    length_multiples: tuple[int, ...] = (1, 2, 4)  # RNN evaluation lengths, times seq_len
    lstm_hidden: int = 128
    transformer_width: int = 64
    transformer_depth: int = 2
    optimize_compiled: bool = True  # False: compile without XLA backend optimizations (CI)


QUICK = TextConfig(
    steps=200, seq_len=16, eval_every=50, validation_chars=4096, length_multiples=(1, 4),
    learning_rate=2e-2, lstm_hidden=32, transformer_width=32, transformer_depth=1,
    optimize_compiled=False,
)
RUNS = tuple(("lstm", norm) for norm in LSTM_NORMS) + tuple(
    ("transformer", norm) for norm in TRANSFORMER_NORMS
)


def build_text_model(family: str, norm: str, config: TextConfig) -> nn.Module:
    """The ``family`` (``lstm`` or ``transformer``) model with ``norm``, sized by ``config``."""
    if family == "lstm":
        return CharLSTM(VOCAB_SIZE, norm, hidden=config.lstm_hidden)
    if family == "transformer":
        return CharTransformer(
            VOCAB_SIZE, norm, max_len=config.seq_len, width=config.transformer_width,
            depth=config.transformer_depth,
        )
    raise ValueError(f"family must be 'lstm' or 'transformer', got {family!r}")


@dataclass
class TextRunResult:
    """One trained model: validation bits per character by length, speed and the curve."""

    model: str
    norm: str
    parameters: int
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation bpc)
    bpc_by_length: dict[int, float] = field(default_factory=dict)
    bpc_beyond_train_length: float | None = None  # positions >= T of the longest evaluation

    @property
    def bpc(self) -> float:
        """Validation bits per character at the training length."""
        return self.bpc_by_length[min(self.bpc_by_length)]

    def record(self) -> dict[str, Any]:
        """The ``text_results.json`` entry."""
        return {
            "model": self.model,
            "norm": self.norm,
            "parameters": self.parameters,
            "bpc": self.bpc,
            "bpc_by_length": {str(k): v for k, v in self.bpc_by_length.items()},
            "bpc_beyond_train_length": self.bpc_beyond_train_length,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "train_seconds": round(self.train_seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
            "curve": [[step, bpc] for step, bpc in self.curve],
        }


def validation_windows(tokens: np.ndarray, length: int, chars: int) -> tuple[np.ndarray, ...]:
    """The first ``chars`` validation predictions as non-overlapping windows: inputs
    ``(chars // length, length)`` and the next characters as targets, the same shape.

    Args:
      tokens: validation token ids.
      length: window (sequence) length.
      chars: number of predicted characters; a multiple of ``length``.
    """
    if chars % length:
        raise ValueError(f"validation chars {chars} is not a multiple of length {length}")
    if chars + 1 > len(tokens):
        raise ValueError(f"validation has {len(tokens)} characters, {chars + 1} needed")
    inputs = tokens[:chars].reshape(-1, length)
    targets = tokens[1 : chars + 1].reshape(-1, length)
    return inputs, targets


def make_position_loss(model: nn.Module) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``(variables, inputs, targets) -> (T,)``: the mean cross-entropy in bits at every
    position, over the windows, in evaluation mode (running statistics)."""

    def position_loss(variables: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        logits = model.apply(variables, inputs, train=False)
        nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nats.mean(axis=0) / LN2

    return jax.jit(position_loss)


def random_windows(
    tokens: np.ndarray, config: TextConfig
) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """``step -> (inputs, targets)``: ``batch_size`` windows of ``seq_len`` characters at
    random offsets (fixed by the seed), the targets one character later."""
    offsets = np.random.default_rng(config.seed).integers(
        0, len(tokens) - config.seq_len - 1, size=(config.steps, config.batch_size)
    )
    span = np.arange(config.seq_len + 1)

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        windows = tokens[offsets[step][:, None] + span]
        return windows[:, :-1], windows[:, 1:]

    return batch


def evaluation_variables(variables: dict[str, Any], length: int) -> dict[str, Any]:
    """``variables`` for a ``length``-step evaluation: per-step statistics stretched to it."""
    return {
        "params": variables["params"],
        "batch_stats": statistics_for_length(variables["batch_stats"], length),
    }


def compile_for(
    function: Callable[..., Any], config: TextConfig, *args: Any
) -> Callable[..., Any]:
    """``function`` (jitted) compiled for ``args``' shapes; unoptimized for a quick run."""
    options = None if config.optimize_compiled else UNOPTIMIZED
    jitted = function if hasattr(function, "lower") else jax.jit(function)
    return jitted.lower(*args).compile(options)


def initialize(
    model: nn.Module, optimizer: optax.GradientTransformation, config: TextConfig
) -> tuple[Any, Any, Any]:
    """``(params, batch_stats, opt_state)`` from ``config.seed``, compiled unoptimized (it
    runs once)."""

    def init(seed: jax.Array) -> tuple[Any, Any, Any]:
        tokens = jnp.zeros((config.batch_size, config.seq_len), jnp.int32)
        variables = model.init(jax.random.key(seed), tokens, train=False)
        params = variables["params"]
        return params, variables.get("batch_stats", {}), optimizer.init(params)

    return jax.jit(init).lower(config.seed).compile(UNOPTIMIZED)(config.seed)


def make_optimizer(config: TextConfig) -> optax.GradientTransformation:
    """AdamW with a linear warm-up over the first 5% of the steps, then cosine decay to 0,
    after clipping the gradient's global norm to 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(1, config.steps // 20), config.steps
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay)
    )


@dataclass
class TextTrainer:
    """One model's compiled training step and evaluations, and its state as it trains.

    Attributes:
      config: the run's settings.
      state: ``(params, batch_stats, opt_state)``.
      batch: ``step -> (inputs, targets)`` training windows.
      windows: evaluation length → validation ``(inputs, targets)``.
      train_step: the compiled AdamW step (``train_digits.make_train_step``).
      evaluate: evaluation length → compiled per-position bits.
    """

    config: TextConfig
    state: tuple[Any, Any, Any]
    batch: Callable[[int], tuple[np.ndarray, np.ndarray]]
    windows: dict[int, tuple[np.ndarray, np.ndarray]]
    train_step: Callable[..., Any] = field(repr=False)
    evaluate: dict[int, Callable[..., Any]] = field(repr=False)

    @classmethod
    def compile(cls, model: nn.Module, corpus: Corpus, lengths: Sequence[int],
                config: TextConfig) -> TextTrainer:
        """Initializes ``model`` and compiles its step and its evaluation at ``lengths``."""
        optimizer = make_optimizer(config)
        state = initialize(model, optimizer, config)
        batch = random_windows(corpus.train, config)
        windows = {n: validation_windows(corpus.validation, n, config.validation_chars)
                   for n in lengths}
        step = make_train_step(model, optimizer, None)
        position_loss = make_position_loss(model)
        variables = {"params": state[0], "batch_stats": state[1]}
        return cls(
            config, state, batch, windows, compile_for(step, config, *state, *batch(0)),
            {n: compile_for(position_loss, config, evaluation_variables(variables, n),
                            *windows[n]) for n in lengths},
        )

    def step(self, step: int) -> jax.Array:
        """Trains on batch ``step`` (from 0); returns the loss in nats (not waited for)."""
        params, batch_stats, opt_state, loss = self.train_step(*self.state, *self.batch(step))
        self.state = (params, batch_stats, opt_state)
        return loss

    def validation_bits(self, length: int) -> np.ndarray:
        """Bits per character at each of the ``length`` positions, over the windows."""
        variables = evaluation_variables(
            {"params": self.state[0], "batch_stats": self.state[1]}, length
        )
        return np.asarray(self.evaluate[length](variables, *self.windows[length]))


def train(
    family: str, norm: str, corpus: Corpus, config: TextConfig, *, progress: bool = True
) -> TextRunResult:
    """Trains one model on random train windows and scores it on validation: every
    ``eval_every`` steps at length T (the curve), at the end at every evaluation length
    (the LSTMs at ``length_multiples`` of T, the transformers at T)."""
    model = build_text_model(family, norm, config)
    multiples = config.length_multiples if family == "lstm" else (1,)
    lengths = [config.seq_len * multiple for multiple in multiples]
    started = time.perf_counter()
    trainer = TextTrainer.compile(model, corpus, lengths, config)
    result = TextRunResult(family, norm, sum(p.size for p in jax.tree.leaves(trainer.state[0])))
    result.compile_seconds = time.perf_counter() - started

    steps = tqdm(range(1, config.steps + 1), desc=f"{family}/{norm}", disable=not progress)
    for step in steps:
        started = time.perf_counter()
        loss = trainer.step(step - 1)
        if step % config.eval_every == 0 or step == config.steps:
            loss = float(loss)  # waits for the queued steps, so they count as training time
            result.train_seconds += time.perf_counter() - started
            result.curve.append((step, float(trainer.validation_bits(config.seq_len).mean())))
            steps.set_postfix(train_bpc=f"{loss / LN2:.3f}", val_bpc=f"{result.curve[-1][1]:.3f}")
        else:
            result.train_seconds += time.perf_counter() - started
    tokens = config.steps * config.batch_size * config.seq_len
    result.tokens_per_second = tokens / max(result.train_seconds, 1e-9)
    for length in lengths:
        bits = trainer.validation_bits(length)
        result.bpc_by_length[length] = float(bits.mean())
        if length == max(lengths) and length > config.seq_len:
            result.bpc_beyond_train_length = float(bits[config.seq_len :].mean())
    return result


def plot_curves(
    results: Sequence[TextRunResult], unigram_bpc: float, seq_len: int, path: Path
) -> None:
    """Validation bpc per step for every model with the unigram baseline, and bpc against
    evaluation length for the LSTMs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axes, length_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        steps, bpc = zip(*result.curve, strict=True)
        curve_axes.plot(steps, bpc, marker=".", label=f"{result.model}/{result.norm}")
        if len(result.bpc_by_length) > 1:
            lengths = sorted(result.bpc_by_length)
            length_axes.plot(
                lengths, [result.bpc_by_length[n] for n in lengths], marker="o",
                label=f"{result.model}/{result.norm}",
            )
    curve_axes.axhline(unigram_bpc, color="gray", linestyle="--", label="unigram")
    length_axes.axvline(seq_len, color="black", linewidth=0.8, label="training length")
    lengths = sorted({n for result in results for n in result.bpc_by_length})
    length_axes.set_xscale("log", base=2)
    length_axes.set_xticks(lengths, [str(n) for n in lengths])
    for axes in (curve_axes, length_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    curve_axes.set(xlabel="training step", ylabel="validation bits per character",
                   title=f"Validation bpc (length {seq_len})")
    length_axes.set(xlabel="evaluation length (characters)", ylabel="validation bpc",
                    title=f"LSTMs trained on length {seq_len}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_table(results: Sequence[TextRunResult], unigram_bpc: float, seq_len: int) -> str:
    """The comparison as a plain-text table (bits per character on validation)."""
    long = max((max(r.bpc_by_length) for r in results), default=seq_len)
    long_header = f"bpc@{long}" if long > seq_len else "longer"
    header = f"{'model':<13}{'norm':<12}{f'bpc@{seq_len}':>9}{long_header:>10}"
    lines = [header + f"{'>T only':>9}{'tokens/s':>10}{'compile s':>11}"]
    for r in results:
        at_long = "-"
        if long > seq_len and long in r.bpc_by_length:
            at_long = f"{r.bpc_by_length[long]:.3f}"
        beyond = "-" if r.bpc_beyond_train_length is None else f"{r.bpc_beyond_train_length:.3f}"
        lines.append(
            f"{r.model:<13}{r.norm:<12}{r.bpc:>9.3f}{at_long:>10}{beyond:>9}"
            f"{r.tokens_per_second:>10.0f}{r.compile_seconds:>11.1f}"
        )
    lines.append(f"{'unigram':<25}{unigram_bpc:>9.3f}")
    return "\n".join(lines)


def selected_runs(models: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(family, norm)`` runs named by ``--model``: a family or ``family/norm``."""
    return [run for run in RUNS if run[0] in models or "/".join(run) in models]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    choices = ("lstm", "transformer", *("/".join(run) for run in RUNS))
    parser.add_argument("--model", nargs="+", choices=choices, default=["lstm", "transformer"],
                        help="families or single runs (default: all six)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--seq-len", type=int, default=None, help="training sequence length T")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"peak AdamW learning rate (default {TextConfig.learning_rate})")
    parser.add_argument("--seed", type=int, default=TextConfig.seed)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: tiny models, few steps, unoptimized compiles")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def config_from_args(args: argparse.Namespace) -> TextConfig:
    """The defaults (or :data:`QUICK`) with ``--steps``, ``--seq-len`` and ``--seed``."""
    base = QUICK if args.quick else TextConfig()
    steps = args.steps or base.steps
    seq_len = args.seq_len or base.seq_len
    longest = seq_len * max(base.length_multiples)
    return TextConfig(**{
        **asdict(base),
        "steps": steps,
        "seq_len": seq_len,
        "seed": args.seed,
        "learning_rate": args.learning_rate or base.learning_rate,
        "eval_every": min(base.eval_every, steps),
        # a whole number of the longest windows, so every length scores the same characters
        "validation_chars": max(1, base.validation_chars // longest) * longest,
    })


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains and compares the selected models; returns what ``text_results.json`` holds."""
    args = parse_args(argv)
    config = config_from_args(args)
    corpus = load_stdlib_corpus()
    unigram_bpc = unigram_bits_per_char(corpus.train, corpus.validation)
    described = corpus.description
    print(
        f"stdlib text: {described['train_chars']:,} train / {described['validation_chars']:,} "
        f"validation characters ({len(described['train_files'])} / "
        f"{len(described['validation_files'])} files), unigram {unigram_bpc:.3f} bpc, "
        f"{config.steps} steps of {config.batch_size}x{config.seq_len} characters"
    )
    progress = not args.no_progress and sys.stderr.isatty()
    results = [
        train(family, norm, corpus, config, progress=progress)
        for family, norm in selected_runs(args.model)
    ]
    summary = {
        "corpus": described,
        "unigram_bpc": unigram_bpc,
        "config": asdict(config),
        "runs": [result.record() for result in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "text_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(results, unigram_bpc, config.seq_len, args.out / "text_curves.png")
    print("\n" + format_table(results, unigram_bpc, config.seq_len))
    print(f"\nwrote {args.out / 'text_results.json'} and {args.out / 'text_curves.png'}")
    return summary


if __name__ == "__main__":
    main()

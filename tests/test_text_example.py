"""The text example (issue #12): stdlib corpus, LSTM cells against float64 NumPy, per-step
batch norm beyond the training length, causal transformers, and the ``--quick`` run."""

from __future__ import annotations

import collections
import hashlib
import json
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import linen as jnn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import text_models
import train_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cheaply(function, *args):
    """``function(*args)``, jitted and compiled without XLA's backend optimizations."""
    return train_text.compile_for(function, train_text.QUICK, *args)(*args)


@pytest.fixture(scope="module")
def corpus() -> train_text.Corpus:
    return train_text.load_stdlib_corpus()


def test_corpus_is_the_documented_stdlib_files_split_by_file(corpus: train_text.Corpus) -> None:
    described = corpus.description
    assert not set(train_text.TRAIN_MODULES) & set(train_text.VALIDATION_MODULES)
    assert described["validation_files"][0] == "calendar.py"
    listed = {"train": list(train_text.TRAIN_MODULES),
              "validation": list(train_text.VALIDATION_MODULES)}
    expected_hash = hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
    assert described["file_list_sha256"] == expected_hash
    stdlib = Path(described["source"])
    validation_text = "".join(
        (stdlib / f"{m}.py").read_text(encoding="utf-8") for m in train_text.VALIDATION_MODULES
    )
    assert described["validation_chars"] == len(validation_text) == len(corpus.validation)
    assert described["total_chars"] == len(corpus.train) + len(corpus.validation) > 10**6
    # printable ASCII maps to itself in the vocabulary; anything else to the one extra id
    decoded = "".join(train_text.VOCABULARY[i] for i in corpus.validation[:2000])
    assert decoded == validation_text[:2000]


def test_encode_maps_non_ascii_to_the_extra_id_and_a_missing_file_is_named(
    tmp_path: Path,
) -> None:
    ids = train_text.encode("a\té€\n")
    assert ids.tolist() == [
        train_text.VOCABULARY.index("a"), 0, train_text.OTHER, train_text.OTHER, 1
    ]
    with pytest.raises(FileNotFoundError, match="'abc'"):
        train_text.load_stdlib_corpus(tmp_path)


def test_unigram_baseline_is_the_smoothed_train_frequencies_cross_entropy_on_validation(
) -> None:
    train, validation = "aab\nab", "abz"  # z never seen in training
    counts = collections.Counter(train)
    total = len(train) + train_text.VOCAB_SIZE
    expected = -np.mean([np.log2((counts[c] + 1) / total) for c in validation])
    actual = train_text.unigram_bits_per_char(
        train_text.encode(train), train_text.encode(validation)
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def numpy_lstm_step(params, stats, x, cell, hidden, norm: str):
    """One LSTM step in float64 NumPy: LayerNorm (eps 1e-6) over features or BatchNorm
    (eps 1e-5, biased batch variance) over the batch, as the cell's docstring states."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def normalize(z, name):
        if norm == "none":
            return z
        axis, eps = (-1, 1e-6) if norm == "layer" else (0, 1e-5)
        if stats is not None and norm == "batch":
            mean, var = (np.asarray(stats[name][k], np.float64) for k in ("mean", "var"))
        else:
            mean, var = z.mean(axis, keepdims=True), z.var(axis, keepdims=True)
        return (z - mean) / np.sqrt(var + eps) * p[name]["scale"] + p[name].get("bias", 0.0)

    gates = (normalize(x @ p["input"]["kernel"], "input_norm")
             + normalize(hidden @ p["recurrent"]["kernel"], "recurrent_norm") + p["bias"])
    i, f, g, o = np.split(gates, 4, axis=-1)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    cell = sigmoid(f) * cell + sigmoid(i) * np.tanh(g)
    return cell, sigmoid(o) * np.tanh(normalize(cell, "cell_norm"))


@pytest.mark.parametrize("norm", text_models.LSTM_NORMS)
def test_lstm_cell_equals_float64_numpy_in_training_and_evaluation(norm: str) -> None:
    rng = np.random.default_rng(0)
    x, cell, hidden = (rng.normal(size=(6, n)).astype(np.float32) for n in (5, 4, 4))
    model = text_models.LSTMCell(hidden=4, norm=norm, train=True)
    variables = cheaply(model.init, jax.random.key(1), (cell, hidden), x)
    params = jax.tree.map(  # away from the initial scale 1 / 0.1 and bias 0
        lambda a: a + rng.normal(scale=0.3, size=a.shape).astype(np.float32),
        variables["params"],
    )
    ((c, h), out), updates = cheaply(
        lambda v, carry, x: model.apply(v, carry, x, mutable=["batch_stats"]),
        {**variables, "params": params}, (cell, hidden), x,
    )
    expected_c, expected_h = numpy_lstm_step(params, None, x, cell, hidden, norm)
    np.testing.assert_allclose(c, expected_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, expected_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, h)
    if norm == "batch":  # evaluation: the running statistics, moved 10% towards the batch's
        stats = updates["batch_stats"]
        np.testing.assert_allclose(
            stats["cell_norm"]["mean"], 0.1 * expected_c.mean(0), rtol=1e-5, atol=1e-6
        )
        evaluation = text_models.LSTMCell(hidden=4, norm=norm, train=False)
        (c, h), _ = cheaply(
            evaluation.apply, {"params": params, "batch_stats": stats}, (cell, hidden), x
        )
        expected_c, expected_h = numpy_lstm_step(params, stats, x, cell, hidden, norm)
        np.testing.assert_allclose(h, expected_h, rtol=1e-5, atol=1e-5)


def test_per_step_batch_norm_keeps_one_statistic_per_step_and_reuses_the_last_beyond_t() -> None:
    model = text_models.CharLSTM(train_text.VOCAB_SIZE, "batch", embed=4, hidden=8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 98, size=(16, 20)), jnp.int32)
    variables = cheaply(partial(model.init, train=False), jax.random.key(0), tokens[:, :5])
    _, updates = cheaply(
        partial(model.apply, train=True, mutable=["batch_stats"]), variables, tokens[:, :5]
    )
    stats = updates["batch_stats"]["lstm"]
    assert stats["input_norm"]["mean"].shape == (5, 32) and stats["cell_norm"]["var"].shape == (
        5, 8)
    # step 0 starts from h = 0: its recurrent statistics are exactly zero (moved 10% from 0)
    np.testing.assert_array_equal(stats["recurrent_norm"]["mean"][0], 0.0)
    assert np.all(np.abs(stats["recurrent_norm"]["mean"][1:]).max(axis=1) > 0)

    stretched = text_models.statistics_for_length(updates["batch_stats"], 20)["lstm"]
    for name in stats:
        np.testing.assert_array_equal(stretched[name]["var"][:5], stats[name]["var"])
        np.testing.assert_array_equal(
            stretched[name]["var"][5:], np.broadcast_to(stats[name]["var"][4], (15, 32 if
                                                        "cell" not in name else 8))
        )
    params = variables["params"]
    apply = partial(model.apply, train=False)
    long = cheaply(apply, {"params": params, "batch_stats": {"lstm": stretched}}, tokens)
    short = cheaply(apply, {"params": params, **updates}, tokens[:, :5])
    np.testing.assert_allclose(long[:, :5], short, rtol=1e-5, atol=1e-6)  # causal, same stats
    with pytest.raises(ValueError, match="length"):
        text_models.statistics_for_length(updates["batch_stats"], 0)


@pytest.mark.parametrize("norm", text_models.TRANSFORMER_NORMS)
def test_transformer_is_causal_and_normalizes_after_every_addition(norm: str) -> None:
    model = text_models.CharTransformer(train_text.VOCAB_SIZE, norm, max_len=8, width=16,
                                        depth=1, heads=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 98, size=(2, 8)), jnp.int32)
    variables = cheaply(partial(model.init, train=False), jax.random.key(0), tokens)
    norms = sorted(k for k in variables["params"] if k.startswith("norm_"))
    # pre-norm: before each of the 2 sublayers and before the read-out; post-norm: after each
    assert norms == (["norm_1", "norm_2"] if norm == "post_layer"
                     else ["norm_0", "norm_1", "norm_2"])
    assert ("bias" in variables["params"]["norm_1"]) == (norm != "pre_rms")
    apply = jax.jit(partial(model.apply, train=False))
    logits = cheaply(apply, variables, tokens)
    changed = cheaply(apply, variables, tokens.at[:, 5].set(7))
    np.testing.assert_array_equal(changed[:, :5], logits[:, :5])
    assert np.abs(changed[:, 5:] - logits[:, 5:]).max() > 1e-4
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(apply, variables, jnp.zeros((1, 9), jnp.int32))


def test_residual_norms_return_the_normalized_sum_and_the_sum() -> None:
    # the transformer's post-addition norms: jaxnorm.linen.AddAndNorm, with LayerNorm's and
    # RMSNorm's parameters
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    residual = np.ones((2, 3), np.float32)
    for kind, norm in (("layer", jnn.LayerNorm()), ("rms", jnn.RMSNorm())):
        module = jnn.AddAndNorm(kind=kind)
        variables = module.init(jax.random.key(0), x, residual)
        normalized, summed = module.apply(variables, x, residual)
        np.testing.assert_array_equal(summed, x + 1)
        np.testing.assert_allclose(normalized, norm.apply(variables, x + 1), rtol=1e-6)


def test_bad_arguments_are_errors_naming_them(corpus: train_text.Corpus) -> None:
    with pytest.raises(ValueError, match="multiple of length"):
        train_text.validation_windows(corpus.validation, 64, 100)
    with pytest.raises(ValueError, match="family"):
        train_text.build_text_model("gru", "none", train_text.TextConfig())
    with pytest.raises(ValueError, match="norm must be one of"):
        jax.eval_shape(partial(text_models.CharLSTM(98, "group").init, train=False),
                       jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(SystemExit):
        train_text.parse_args(["--steps", "0"])


def test_quick_run_writes_table_json_and_plot_and_every_model_beats_unigram(
    tmp_path: Path, capsys
) -> None:
    summary = train_text.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "text_results.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(written) == {"corpus", "unigram_bpc", "config", "runs"}
    corpus = written["corpus"]
    assert {"file_list_sha256", "content_sha256", "train_chars", "validation_chars",
            "total_chars", "train_files", "validation_files"} <= set(corpus)
    unigram = written["unigram_bpc"]
    assert 4.0 < unigram < 5.5  # Python source: ~4.6 bits per character
    seq_len = written["config"]["seq_len"]
    assert [(r["model"], r["norm"]) for r in written["runs"]] == list(train_text.RUNS)
    for run in written["runs"]:
        assert run["bpc"] < unigram - 0.2, run
        assert run["bpc"] == run["bpc_by_length"][str(seq_len)] == run["curve"][-1][1]
        assert run["tokens_per_second"] > 0 and run["compile_seconds"] > 0
        lengths = {str(seq_len), str(4 * seq_len)} if run["model"] == "lstm" else {str(seq_len)}
        assert set(run["bpc_by_length"]) == lengths
        assert (run["bpc_beyond_train_length"] is None) == (run["model"] == "transformer")
        assert all(np.isfinite(v) for v in run["bpc_by_length"].values())
    assert (tmp_path / "text_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    output = capsys.readouterr().out
    assert "unigram" in output and f"bpc@{4 * seq_len}" in output

"""The examples run end to end in a reduced mode (issue #4): models, training, folding, styles.

Shapes and variable trees are checked with ``jax.eval_shape`` (no compilation); the
end-to-end runs use ``--quick`` (one epoch, few steps) to keep the number of compiles low.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import models
import style_statistics
import train_digits

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STATEFUL_NORMS = {"batch", "batch_renorm", "ghost_batch"}


def compiled(function, *args):
    """``jax.jit(function)(*args)``, compiled without XLA's backend optimizations (cheap)."""
    jitted = function if hasattr(function, "lower") else jax.jit(function)
    return jitted.lower(*args).compile(train_digits.UNOPTIMIZED)(*args)


@pytest.fixture(scope="module")
def digits() -> train_digits.Digits:
    return train_digits.load_digit_split()


def test_digit_split_is_the_fixed_stratified_quarter(digits: train_digits.Digits) -> None:
    assert digits.train_images.shape == (1347, 8, 8, 1)
    assert digits.test_images.shape == (450, 8, 8, 1)
    assert digits.train_images.dtype == np.float32
    assert 0.0 == digits.train_images.min() and digits.train_images.max() == 1.0
    # stratified: every class is ~25% test
    test_share = np.bincount(digits.test_labels) / (
        np.bincount(digits.test_labels) + np.bincount(digits.train_labels)
    )
    np.testing.assert_allclose(test_share, 0.25, atol=0.01)
    again = train_digits.load_digit_split()
    np.testing.assert_array_equal(again.test_labels, digits.test_labels)


@pytest.mark.parametrize("model_name", sorted(models.MODELS))
def test_every_model_takes_every_norm_and_maps_digits_to_ten_logits(model_name: str) -> None:
    images = jnp.zeros((16, 8, 8, 1))
    for norm in models.NORM_KINDS:
        model = models.build_model(model_name, norm)
        logits, variables = jax.eval_shape(
            lambda m=model: m.init_with_output(jax.random.key(0), images, train=True)
        )
        assert logits.shape == (16, 10), (model_name, norm)
        if norm in STATEFUL_NORMS:
            running = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
            names = {path[-1].key for path, _ in running}
            assert names == {"mean", "var"}, (model_name, norm)
        else:
            assert "batch_stats" not in variables, (model_name, norm)
        if norm == "none":
            layer_names = {
                entry.key
                for path, _ in jax.tree_util.tree_leaves_with_path(variables)
                for entry in path
            }
            assert "norm" not in layer_names and "conv" in layer_names


def test_unknown_norm_or_model_is_a_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="batch_renorm"):
        models.norm_factory("weight")
    with pytest.raises(ValueError, match="densenet"):
        models.build_model("vgg", "batch")


def test_densenet_pre_activation_norms_cannot_fold() -> None:
    model = models.build_model("densenet", "batch")
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False)
    )
    with pytest.raises(ValueError, match="right after a conv"):
        models.fold_batch_norms(variables)


def test_devices_flag_requests_host_devices_before_jax_starts(monkeypatch) -> None:
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo")
    train_digits._request_host_devices(["--quick", "--devices", "4"])
    assert os.environ["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", "")
    train_digits._request_host_devices(["--devices=1"])
    assert os.environ["XLA_FLAGS"] == ""


def test_train_digits_quick_run_writes_results_plot_and_folds(tmp_path: Path, capsys) -> None:
    records = train_digits.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == records
    assert [(r["model"], r["norm"]) for r in written] == [("resnet", "none"), ("resnet", "batch")]
    for record in written:
        assert {"model", "norm", "test_accuracy", "train_seconds"} <= set(record)
        assert 0.0 <= record["test_accuracy"] <= 1.0 and record["train_seconds"] > 0
    # one epoch of the BatchNorm ResNet is far above chance (0.1)
    assert written[1]["test_accuracy"] > 0.5
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    output = capsys.readouterr().out
    assert "same predictions on all 450 test images" in output
    assert "speed-up" in output


def test_train_digits_command_line_trains_darknet_on_two_devices_and_folds(
    tmp_path: Path,
) -> None:
    # a fresh process: --devices 2 itself must make XLA create the two host devices
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES.parent), environment.get("PYTHONPATH", "")]
    )
    command = [sys.executable, str(EXAMPLES / "train_digits.py"), "--quick", "--devices", "2"]
    command += ["--model", "darknet", "--norms", "batch", "--out", str(tmp_path)]
    finished = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "2 cpu device(s)" in finished.stdout
    assert "same predictions on all 450 test images" in finished.stdout
    (record,) = json.loads((tmp_path / "results.json").read_text())
    assert (record["model"], record["norm"]) == ("darknet", "batch")
    assert record["test_accuracy"] > 0.2


def test_data_parallel_step_with_synchronized_batch_norm_equals_the_one_device_step(
    digits: train_digits.Digits,
) -> None:
    # one AdamW step on 64 images sharded over 2 devices: BatchNorm(axis_name="data") sees
    # the statistics of all 64, and the averaged gradients are those of the whole batch
    images, labels = digits.train_images[:64], digits.train_labels[:64]
    # Adam's first step moves each weight by lr * g / (|g| + eps): with the default eps
    # (1e-8) a weight whose gradient is ~1e-8 moves by a fraction of lr set by the
    # round-off of g, so two float32 summation orders can differ there by ~lr. eps = 1e-3
    # keeps the step well-conditioned (round-off of g moves it by < 1e-6) while a wrong
    # gradient still shows at full size.
    optimizer = optax.adamw(1e-2, eps=1e-3)
    model = models.build_model("resnet", "batch")

    def initialize(key: jax.Array) -> tuple:
        variables = model.init(key, images, train=False)
        return variables["params"], variables["batch_stats"], optimizer.init(variables["params"])

    state = compiled(initialize, jax.random.key(0))
    outputs = []
    for mesh in (None, train_digits.data_mesh(2)):
        model = models.build_model("resnet", "batch", axis_name=mesh and train_digits.DATA_AXIS)
        step = train_digits.make_train_step(model, optimizer, mesh)
        outputs.append(compiled(step, *jax.tree.map(jnp.copy, state), images, labels))
    (params, stats, _, loss), (params_2, stats_2, _, loss_2) = outputs
    np.testing.assert_allclose(loss_2, loss, rtol=1e-5)
    expected, actual = jax.tree.leaves((params, stats)), jax.tree.leaves((params_2, stats_2))
    for a, b in zip(expected, actual, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_style_statistics_quick_run_writes_grids_and_transfers_channel_statistics(
    tmp_path: Path,
) -> None:
    metrics = style_statistics.main(["--quick", "--out", str(tmp_path)])
    # AdaIN output features carry the style features' channel means (float32 round-off)
    assert metrics["adain_channel_mean_error"] < 1e-4
    assert np.isfinite(metrics["adain_reconstruction_mse"])
    assert np.isfinite(metrics["conditional_instance_norm_mse"])
    for name in ("adain.png", "conditional_instance_norm.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


def test_conditional_styles_differ_only_in_their_norm_parameters() -> None:
    model = style_statistics.ConditionalStyler(num_styles=len(style_statistics.STYLES))
    variables = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
    )
    per_style = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
        if "ConditionalInstanceNorm" in jax.tree_util.keystr(path)
    }
    assert per_style and all(shape[0] == 4 for shape in per_style.values())

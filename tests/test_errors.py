"""Bad input gets a clear error naming the argument (docs/design.md, "Errors"), never a silently
wrong answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

X = np.ones((2, 3, 4, 6), np.float32)  # NHWC: 6 channels
X[0, 0, 0, 0] = 2.0
C = np.ones(6, np.float32)
WRONG = np.ones(5, np.float32)


def _case(call, error, match, id):
    return pytest.param(call, error, match, id=id)


AXES = [
    _case(lambda: jaxnorm.moments(X, 4), ValueError, "axes", "moments-axis-out-of-range"),
    _case(lambda: jaxnorm.moments(X, (0, -4)), ValueError, "axes", "moments-duplicate-axes"),
    _case(
        lambda: jaxnorm.normalize(X, (1, 5)),
        ValueError,
        "reduction_axes",
        "normalize-reduction-axes-out-of-range",
    ),
    _case(
        lambda: jaxnorm.normalize(X, (1, 2), feature_axes=(3, -1)),
        ValueError,
        "feature_axes",
        "normalize-duplicate-feature-axes",
    ),
    _case(lambda: jaxnorm.batch_norm(X, axis=-5), ValueError, "axis", "batch-norm-axis"),
    _case(
        lambda: jaxnorm.batch_norm_inference(X, C, C, axis=4),
        ValueError,
        "axis",
        "batch-norm-inference-axis",
    ),
    _case(
        lambda: jaxnorm.layer_norm(X, reduction_axes=(2, 2)),
        ValueError,
        "reduction_axes",
        "layer-norm-duplicate-reduction-axes",
    ),
    _case(
        lambda: jaxnorm.layer_norm(X, feature_axes=7),
        ValueError,
        "feature_axes",
        "layer-norm-feature-axes",
    ),
    _case(
        lambda: jaxnorm.rms_norm(X, reduction_axes=-5),
        ValueError,
        "reduction_axes",
        "rms-norm-reduction-axes",
    ),
    _case(
        lambda: jaxnorm.instance_norm(X, feature_axes=(1, 1)),
        ValueError,
        "feature_axes",
        "instance-norm-duplicate-feature-axes",
    ),
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=2, feature_axis=4),
        ValueError,
        "feature_axis",
        "group-norm-feature-axis",
    ),
    _case(
        lambda: jaxnorm.local_response_norm(X, feature_axis=-5),
        ValueError,
        "feature_axis",
        "lrn-feature-axis",
    ),
    _case(
        lambda: jaxnorm.adaptive_instance_norm(X, X, feature_axes=9),
        ValueError,
        "feature_axes",
        "adain-feature-axes",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6)), None, C, C, output_axis=2),
        ValueError,
        "output_axis",
        "fold-output-axis",
    ),
]

GROUPS = [
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=4),
        ValueError,
        "num_groups",
        "num-groups-does-not-divide-channels",
    ),
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=0),
        ValueError,
        "num_groups",
        "zero-groups",
    ),
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=2, group_size=3),
        ValueError,
        "num_groups.*group_size",
        "both-num-groups-and-group-size",
    ),
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=None),
        ValueError,
        "num_groups.*group_size",
        "neither-num-groups-nor-group-size",
    ),
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=None, group_size=4),
        ValueError,
        "group_size",
        "group-size-does-not-divide-channels",
    ),
]

SHAPES = [
    _case(lambda: jaxnorm.normalize(X, -1, WRONG), ValueError, "scale", "normalize-scale"),
    _case(lambda: jaxnorm.normalize(X, -1, C, WRONG), ValueError, "bias", "normalize-bias"),
    _case(
        lambda: jaxnorm.normalize(X, (0, 1, 2), mean=WRONG, var=C),
        ValueError,
        "mean",
        "normalize-mean",
    ),
    _case(
        lambda: jaxnorm.normalize(X, (0, 1, 2), mean=C, var=WRONG),
        ValueError,
        "var",
        "normalize-var",
    ),
    _case(lambda: jaxnorm.batch_norm(X, WRONG), ValueError, "scale", "batch-norm-scale"),
    _case(lambda: jaxnorm.batch_norm(X, C, WRONG), ValueError, "bias", "batch-norm-bias"),
    _case(
        lambda: jaxnorm.batch_norm(X, np.ones((6, 1), np.float32)),
        ValueError,
        "scale",
        "batch-norm-scale-of-right-size-wrong-rank",
    ),
    _case(
        lambda: jaxnorm.batch_norm_inference(X, WRONG, C),
        ValueError,
        "mean",
        "bn-inference-mean",
    ),
    _case(
        lambda: jaxnorm.batch_norm_inference(X, C, WRONG),
        ValueError,
        "var",
        "bn-inference-var",
    ),
    _case(
        lambda: jaxnorm.batch_norm_inference(X, C, C, WRONG),
        ValueError,
        "scale",
        "bn-inference-scale",
    ),
    _case(
        lambda: jaxnorm.batch_norm_inference(X, C, C, C, WRONG),
        ValueError,
        "bias",
        "bn-inference-bias",
    ),
    _case(lambda: jaxnorm.layer_norm(X, WRONG), ValueError, "scale", "layer-norm-scale"),
    _case(
        lambda: jaxnorm.layer_norm(X, None, np.ones((4, 6))),
        ValueError,
        "bias",
        "layer-norm-bias",
    ),
    _case(lambda: jaxnorm.rms_norm(X, WRONG), ValueError, "scale", "rms-norm-scale"),
    _case(
        lambda: jaxnorm.instance_norm(X, C, WRONG),
        ValueError,
        "bias",
        "instance-norm-bias",
    ),
    _case(
        lambda: jaxnorm.group_norm(X, WRONG, num_groups=2),
        ValueError,
        "scale",
        "group-norm-scale",
    ),
    _case(
        lambda: jaxnorm.group_norm(X, C, WRONG, num_groups=2),
        ValueError,
        "bias",
        "group-norm-bias",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6)), WRONG, C, C),
        ValueError,
        "bias",
        "fold-bias",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6)), C, WRONG, C),
        ValueError,
        "mean",
        "fold-mean",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6)), C, C, WRONG),
        ValueError,
        "var",
        "fold-var",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6)), C, C, C, WRONG),
        ValueError,
        "scale",
        "fold-scale",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6)), C, C, C, C, WRONG),
        ValueError,
        "bn_bias",
        "fold-bn-bias",
    ),
    _case(
        lambda: jaxnorm.adaptive_instance_norm(X, np.ones((2, 3, 4, 5), np.float32)),
        ValueError,
        "style",
        "adain-style-channels",
    ),
]

BAD_MASK = np.ones((2, 5), bool)  # not broadcastable to (2, 3, 4, 6)
MASKS = [
    _case(lambda: jaxnorm.moments(X, 0, mask=BAD_MASK), ValueError, "mask", "moments"),
    _case(lambda: jaxnorm.normalize(X, -1, mask=BAD_MASK), ValueError, "mask", "normalize"),
    _case(lambda: jaxnorm.batch_norm(X, mask=BAD_MASK), ValueError, "mask", "batch-norm"),
    _case(lambda: jaxnorm.layer_norm(X, mask=BAD_MASK), ValueError, "mask", "layer-norm"),
    _case(lambda: jaxnorm.rms_norm(X, mask=BAD_MASK), ValueError, "mask", "rms-norm"),
    _case(lambda: jaxnorm.instance_norm(X, mask=BAD_MASK), ValueError, "mask", "instance-norm"),
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=2, mask=BAD_MASK),
        ValueError,
        "mask",
        "group-norm",
    ),
    _case(
        lambda: jaxnorm.layer_norm(X, mask=np.ones((1, 2, 3, 4, 6), bool)),
        ValueError,
        "mask",
        "mask-that-would-grow-x",
    ),
]

SINGLE_VALUE = [
    _case(
        lambda: jaxnorm.batch_norm(np.ones((1, 6), np.float32)),
        ValueError,
        "one value per channel",
        "dense-batch-of-one",
    ),
    _case(
        lambda: jaxnorm.batch_norm(np.ones((1, 1, 1, 6), np.float32)),
        ValueError,
        "one value per channel",
        "image-batch-of-one-pixel",
    ),
    _case(
        lambda: jaxnorm.batch_norm(np.ones((4, 6), np.float32), axis=(0, 1)),
        ValueError,
        "one value per channel",
        "every-axis-a-feature-axis",
    ),
]

SIZES = [
    _case(lambda: jaxnorm.local_response_norm(X, size=0), ValueError, "size", "zero"),
    _case(lambda: jaxnorm.local_response_norm(X, size=-3), ValueError, "size", "negative"),
]

NEGATIVE_EPS = [
    _case(lambda: jaxnorm.normalize(X, -1, eps=-1e-5), ValueError, "eps", "normalize"),
    _case(lambda: jaxnorm.batch_norm(X, eps=-1e-5), ValueError, "eps", "batch-norm"),
    _case(
        lambda: jaxnorm.batch_norm_inference(X, C, C, eps=-1e-5),
        ValueError,
        "eps",
        "batch-norm-inference",
    ),
    _case(lambda: jaxnorm.layer_norm(X, eps=-1.0), ValueError, "eps", "layer-norm"),
    _case(lambda: jaxnorm.rms_norm(X, eps=-1.0), ValueError, "eps", "rms-norm"),
    _case(lambda: jaxnorm.instance_norm(X, eps=-1.0), ValueError, "eps", "instance-norm"),
    _case(
        lambda: jaxnorm.group_norm(X, num_groups=2, eps=-1.0),
        ValueError,
        "eps",
        "group-norm",
    ),
    _case(
        lambda: jaxnorm.adaptive_instance_norm(X, X, eps=-1.0),
        ValueError,
        "eps",
        "adaptive-instance-norm",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6)), None, C, C, eps=-1.0),
        ValueError,
        "eps",
        "fold",
    ),
]

INTEGER_X = np.ones((2, 3, 4, 6), np.int32)
NON_FLOATING = [
    _case(lambda: jaxnorm.moments(INTEGER_X, 0), TypeError, "x", "moments"),
    _case(lambda: jaxnorm.normalize(INTEGER_X, -1), TypeError, "x", "normalize"),
    _case(lambda: jaxnorm.batch_norm(INTEGER_X), TypeError, "x", "batch-norm"),
    _case(
        lambda: jaxnorm.batch_norm_inference(INTEGER_X, C, C),
        TypeError,
        "x",
        "batch-norm-inference",
    ),
    _case(lambda: jaxnorm.layer_norm(INTEGER_X), TypeError, "x", "layer-norm"),
    _case(lambda: jaxnorm.rms_norm(INTEGER_X > 0), TypeError, "x", "rms-norm-bool"),
    _case(lambda: jaxnorm.instance_norm(INTEGER_X), TypeError, "x", "instance-norm"),
    _case(lambda: jaxnorm.group_norm(INTEGER_X, num_groups=2), TypeError, "x", "group-norm"),
    _case(lambda: jaxnorm.local_response_norm(INTEGER_X), TypeError, "x", "lrn"),
    _case(
        lambda: jaxnorm.adaptive_instance_norm(INTEGER_X, X),
        TypeError,
        "content",
        "adain-content",
    ),
    _case(
        lambda: jaxnorm.adaptive_instance_norm(X, INTEGER_X),
        TypeError,
        "style",
        "adain-style",
    ),
    _case(
        lambda: jaxnorm.fold_batch_norm(np.ones((3, 6), np.int32), None, C, C),
        TypeError,
        "kernel",
        "fold-kernel",
    ),
]


def _assert_raises_naming(call, error, match) -> None:
    with pytest.raises(error, match=match) as raised:
        call()
    assert type(raised.value) is error


@pytest.mark.parametrize("call, error, match", AXES)
def test_out_of_range_or_duplicate_axes_raise_value_error_naming_the_argument(call, error, match):
    _assert_raises_naming(call, error, rf"\b{match}\b")


@pytest.mark.parametrize("call, error, match", GROUPS)
def test_bad_group_arguments_raise_value_error_naming_them(call, error, match):
    _assert_raises_naming(call, error, match)


@pytest.mark.parametrize("call, error, match", SHAPES)
def test_parameter_or_statistic_of_the_wrong_shape_raises_naming_it(call, error, match):
    _assert_raises_naming(call, error, rf"\b{match}\b")


@pytest.mark.parametrize("call, error, match", MASKS)
def test_mask_not_broadcastable_to_x_raises_naming_mask(call, error, match):
    _assert_raises_naming(call, error, rf"\b{match}\b")


@pytest.mark.parametrize("call, error, match", SINGLE_VALUE)
def test_training_batch_norm_with_a_single_value_per_channel_raises(call, error, match):
    _assert_raises_naming(call, error, match)


@pytest.mark.parametrize("call, error, match", SIZES)
def test_non_positive_lrn_size_raises_naming_size(call, error, match):
    _assert_raises_naming(call, error, rf"\b{match}\b")


@pytest.mark.parametrize("call, error, match", NEGATIVE_EPS)
def test_negative_eps_raises_naming_eps(call, error, match):
    _assert_raises_naming(call, error, rf"\b{match}\b")


@pytest.mark.parametrize("call, error, match", NON_FLOATING)
def test_non_floating_input_raises_type_error_naming_it(call, error, match):
    _assert_raises_naming(call, error, rf"\b{match}\b.*floating")


def test_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="num_groups"):
        jax.jit(lambda x: jaxnorm.group_norm(x, num_groups=4))(jnp.asarray(X))
    with pytest.raises(ValueError, match="scale"):
        jax.jit(lambda x, s: jaxnorm.layer_norm(x, s))(jnp.asarray(X), jnp.asarray(WRONG))
    with pytest.raises(ValueError, match="one value per channel"):
        jax.jit(lambda x: jaxnorm.batch_norm(x))(jnp.ones((1, 6)))


def test_mean_without_var_is_rejected():
    with pytest.raises(ValueError, match="mean and var"):
        jaxnorm.normalize(X, (0, 1, 2), mean=C)


def test_valid_edge_cases_do_not_raise():
    """The checks reject only what is wrong: these are all fine (traced, not compiled)."""
    cases = {
        "two examples per channel": (lambda: jaxnorm.batch_norm(X[:2, 0, 0])[0], (2, 6)),
        "mask broadcast over space": (
            lambda: jaxnorm.layer_norm(X, mask=np.ones((2, 1, 1, 6), bool)),
            X.shape,
        ),
        "zero eps": (lambda: jaxnorm.normalize(X, -1, eps=0.0), X.shape),
        "LRN size one": (lambda: jaxnorm.local_response_norm(X, size=1), X.shape),
        "group_size alone": (
            lambda: jaxnorm.group_norm(X, num_groups=None, group_size=2),
            X.shape,
        ),
    }
    for name, (call, shape) in cases.items():
        assert jax.eval_shape(call).shape == shape, name


MALFORMED = [
    _case(lambda: jaxnorm.group_norm(X, num_groups=3, feature_axis=(1, 2)), ValueError,
          "feature_axis", "group-norm-tuple-feature-axis"),
    _case(lambda: jaxnorm.local_response_norm(X, feature_axis=(1, 2)), ValueError,
          "feature_axis", "lrn-tuple-feature-axis"),
    _case(lambda: jaxnorm.group_norm(X, num_groups=2.0), ValueError, "num_groups",
          "float-num-groups"),
    _case(lambda: jaxnorm.group_norm(X, num_groups=None, group_size=1.5), ValueError,
          "group_size", "float-group-size"),
    _case(lambda: jaxnorm.local_response_norm(X, size=True), ValueError, "size", "bool-size"),
    _case(lambda: jaxnorm.layer_norm(X, eps=float("nan")), ValueError, "eps", "nan-eps"),
    _case(lambda: jaxnorm.batch_norm(X, eps=float("nan")), ValueError, "eps", "nan-eps-bn"),
    _case(lambda: jaxnorm.layer_norm(X, mask=np.full(X.shape, 0.3)), TypeError, "mask",
          "float-mask"),
    _case(lambda: jaxnorm.instance_norm(np.ones((4, 6), np.float32)), ValueError,
          "feature_axes", "instance-norm-without-spatial-axes"),
    _case(lambda: jaxnorm.adaptive_instance_norm(np.ones((4, 6), np.float32),
                                                 np.ones((4, 6), np.float32)),
          ValueError, "feature_axes", "adain-without-spatial-axes"),
]


@pytest.mark.parametrize("call, error, match", MALFORMED)
def test_malformed_arguments_raise_naming_the_argument(call, error, match):
    _assert_raises_naming(call, error, rf"\b{match}\b")


def test_numpy_integer_sizes_and_integer_masks_are_accepted():
    y = jaxnorm.local_response_norm(X, size=np.int64(3))
    np.testing.assert_allclose(y, jaxnorm.local_response_norm(X, size=3))
    mask = (np.arange(4) % 2).astype(np.int32)[None, None, :, None]
    np.testing.assert_array_equal(
        jaxnorm.layer_norm(X, mask=mask, reduction_axes=2, feature_axes=-1),
        jaxnorm.layer_norm(X, mask=mask.astype(bool), reduction_axes=2, feature_axes=-1),
    )


def test_a_one_element_feature_axis_tuple_is_the_axis():
    np.testing.assert_array_equal(
        jaxnorm.group_norm(X, num_groups=3, feature_axis=(-1,)),
        jaxnorm.group_norm(X, num_groups=3, feature_axis=-1),
    )


@pytest.mark.parametrize("axes", [None, 2.0, "1"])
def test_axes_that_are_not_ints_raise_type_error_naming_the_argument(axes):
    _assert_raises_naming(lambda: jaxnorm.moments(X, axes), TypeError, r"\baxes\b")

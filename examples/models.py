"""Flax models whose normalization layer is a choice: ResNet, DenseNet and Darknet.

Every model takes ``norm``, a :data:`NormFactory` built by :func:`norm_factory`, and is called
as ``model(images, train)``. ``train=True`` normalizes with batch statistics and updates the
running averages (``batch_stats``); ``train=False`` uses the running averages. With
``norm=None`` the convolutions get a bias and nothing is normalized, which is also the shape
of a model whose BatchNorms were folded into its convolutions (:func:`fold_batch_norms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxnorm
from jaxnorm import linen as jnn

Array = jax.Array
NormFactory = Callable[[bool, str], nn.Module]
"""``(train, name) -> module``: a fresh normalization layer, applied as ``module(x)``."""

NORM_KINDS = ("none", "batch", "group", "layer", "instance", "batch_renorm", "ghost_batch")


def norm_factory(
    kind: str,
    *,
    momentum: float = 0.9,
    num_groups: int = 4,
    virtual_batch_size: int = 16,
    axis_name: str | None = None,
) -> NormFactory | None:
    """The normalization layer named ``kind`` (one of :data:`NORM_KINDS`) for NHWC features.

    - ``batch``: BatchNorm (Ioffe & Szegedy 2015), statistics over N, H, W per channel;
      ``axis_name`` synchronizes them across devices.
    - ``batch_renorm``: Batch Renormalization (Ioffe 2017), BatchNorm corrected towards the
      running statistics by clipped factors ``r``, ``d``.
    - ``ghost_batch``: BatchNorm whose training statistics come from consecutive groups of
      ``virtual_batch_size`` examples (Hoffer et al. 2017).
    - ``group``: GroupNorm (Wu & He 2018), ``num_groups`` groups of channels per sample.
    - ``layer``: LayerNorm (Ba et al. 2016) over H, W, C per sample.
    - ``instance``: InstanceNorm (Ulyanov et al. 2016) over H, W per sample and channel.
    - ``none``: no normalization (returns ``None``).

    ``momentum`` follows Flax: ``running = momentum * running + (1 - momentum) * batch``.
    """
    if kind == "none":
        return None
    if kind == "batch":
        return lambda train, name: jnn.BatchNorm(
            use_running_average=not train, momentum=momentum, axis_name=axis_name, name=name
        )
    if kind == "batch_renorm":
        return lambda train, name: jnn.BatchRenorm(
            use_running_average=not train, momentum=momentum, axis_name=axis_name, name=name
        )
    if kind == "ghost_batch":
        return lambda train, name: jnn.BatchNorm(
            use_running_average=not train,
            momentum=momentum,
            virtual_batch_size=virtual_batch_size,
            name=name,
        )
    if kind == "group":
        return lambda train, name: jnn.GroupNorm(num_groups=num_groups, name=name)
    if kind == "layer":
        return lambda train, name: jnn.LayerNorm(
            reduction_axes=(1, 2, 3), feature_axes=-1, name=name
        )
    if kind == "instance":
        return lambda train, name: jnn.InstanceNorm(name=name)
    raise ValueError(f"norm kind must be one of {NORM_KINDS}, got {kind!r}")


def leaky_relu(x: Array) -> Array:
    """Darknet's activation: ``max(x, 0.1 x)``."""
    return nn.leaky_relu(x, negative_slope=0.1)


class ConvNorm(nn.Module):
    """conv → norm → activation. The conv has no bias when a norm follows (the norm's own
    bias replaces it), so a BatchNorm here folds into the conv exactly."""

    features: int
    norm: NormFactory | None
    kernel_size: tuple[int, int] = (3, 3)
    strides: int = 1
    activation: Callable[[Array], Array] | None = nn.relu

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            use_bias=self.norm is None,
            name="conv",
        )(x)
        if self.norm is not None:
            x = self.norm(train, "norm")(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class NormAct(nn.Module):
    """norm → ReLU: the pre-activation used by DenseNet."""

    norm: NormFactory | None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.norm is not None:
            x = self.norm(train, "norm")(x)
        return nn.relu(x)


class ResidualBlock(nn.Module):
    """He et al. 2016 basic block: ``relu(shortcut(x) + norm(conv(relu(norm(conv(x))))))``;
    the shortcut is a strided 1×1 conv → norm when the shape changes."""

    features: int
    norm: NormFactory | None
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = ConvNorm(self.features, self.norm, strides=self.strides, name="conv_norm1")(
            x, train
        )
        y = ConvNorm(self.features, self.norm, activation=None, name="conv_norm2")(y, train)
        if x.shape[-1] != self.features or self.strides != 1:
            x = ConvNorm(
                self.features,
                self.norm,
                kernel_size=(1, 1),
                strides=self.strides,
                activation=None,
                name="shortcut",
            )(x, train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small ResNet for 8×8 digits: a 3×3 stem, one stage of residual blocks per entry
    of ``stage_features`` (every stage after the first halves H and W), global average
    pooling and a linear classifier."""

    norm: NormFactory | None
    stage_features: Sequence[int] = (16, 32)
    blocks_per_stage: int = 1
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = ConvNorm(self.stage_features[0], self.norm, name="stem")(x, train)
        for stage, features in enumerate(self.stage_features):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(features, self.norm, strides, name=f"stage{stage}_block{block}")(
                    x, train
                )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


class DenseLayer(nn.Module):
    """Huang et al. 2017: ``concat([x, conv3x3(relu(norm(x)))])``, adding ``growth_rate``
    channels."""

    growth_rate: int
    norm: NormFactory | None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = NormAct(self.norm, name="norm_act")(x, train)
        y = nn.Conv(self.growth_rate, (3, 3), use_bias=self.norm is None, name="conv")(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """DenseNet transition layer: norm → ReLU → 1×1 conv (compressing channels) → 2×2
    average pool."""

    features: int
    norm: NormFactory | None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = NormAct(self.norm, name="norm_act")(x, train)
        x = nn.Conv(self.features, (1, 1), use_bias=self.norm is None, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """A small DenseNet: stem conv, dense blocks of ``layers_per_block`` dense layers joined
    by transitions that halve the channels and the resolution, then norm → ReLU → global
    average pooling → linear classifier."""

    norm: NormFactory | None
    growth_rate: int = 8
    num_blocks: int = 2
    layers_per_block: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = nn.Conv(2 * self.growth_rate, (3, 3), name="stem")(x)
        for block in range(self.num_blocks):
            for layer in range(self.layers_per_block):
                x = DenseLayer(self.growth_rate, self.norm, name=f"block{block}_layer{layer}")(
                    x, train
                )
            if block < self.num_blocks - 1:
                x = Transition(x.shape[-1] // 2, self.norm, name=f"transition{block}")(x, train)
        x = NormAct(self.norm, name="final_norm_act")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


class Darknet(nn.Module):
    """A small Darknet (Redmon & Farhadi 2017) CNN: conv(no bias) → BatchNorm →
    LeakyReLU(0.1) blocks, 2×2 max pooling between stages, 1×1 bottlenecks, global average
    pooling and a linear classifier."""

    norm: NormFactory | None
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        def conv_block(x: Array, features: int, kernel: int, name: str) -> Array:
            return ConvNorm(
                features, self.norm, kernel_size=(kernel, kernel), activation=leaky_relu, name=name
            )(x, train)

        x = conv_block(x, 16, 3, "conv_block0")
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = conv_block(x, 32, 3, "conv_block1")
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = conv_block(x, 64, 3, "conv_block2")
        x = conv_block(x, 32, 1, "conv_block3")
        x = conv_block(x, 64, 3, "conv_block4")
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


MODELS: dict[str, type[nn.Module]] = {"resnet": ResNet, "densenet": DenseNet, "darknet": Darknet}


def build_model(
    name: str, norm: str, *, axis_name: str | None = None, virtual_batch_size: int = 16
) -> nn.Module:
    """The model ``name`` (``resnet``, ``densenet`` or ``darknet``) with normalization
    ``norm`` (one of :data:`NORM_KINDS`); see :func:`norm_factory` for the options."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    factory = norm_factory(norm, axis_name=axis_name, virtual_batch_size=virtual_batch_size)
    return MODELS[name](norm=factory)


def fold_batch_norms(variables: Mapping[str, Any], *, eps: float = 1e-5) -> dict[str, Any]:
    """Parameters of the same model built with ``norm=None`` whose outputs equal the
    evaluation-mode outputs of ``variables``: every :class:`ConvNorm` ``conv`` → BatchNorm
    ``norm`` pair becomes one conv with kernel and bias from :func:`jaxnorm.fold_batch_norm`.

    Only conv → norm pairs fold; a norm before a conv (DenseNet's pre-activation) raises
    ``ValueError``.
    """

    def fold(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
        if "conv" in params and "norm" in params and "norm" in stats:
            conv, norm, running = params["conv"], params["norm"], stats["norm"]
            kernel, bias = jaxnorm.fold_batch_norm(
                conv["kernel"],
                conv.get("bias"),
                running["mean"],
                running["var"],
                norm.get("scale"),
                norm.get("bias"),
                eps=eps,
            )
            return {"conv": {"kernel": kernel, "bias": bias}}
        if "norm" in params:
            raise ValueError("only a normalization layer right after a conv can fold")
        return {
            name: fold(value, stats.get(name, {})) if isinstance(value, Mapping) else value
            for name, value in params.items()
        }

    params = variables["params"]
    folded = fold(params, variables.get("batch_stats", {}))
    return {"params": folded}

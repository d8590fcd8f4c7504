"""Character-level language models whose normalization is a choice: an LSTM and a transformer.

Both map integer tokens ``(N, T)`` to next-character logits ``(N, T, vocab_size)`` and are
called as ``model(tokens, train)``.

- :class:`CharLSTM`: an LSTM cell run over time with ``nn.scan`` and one of three norms:
  ``none``; ``layer``, LayerNorm inside the cell (Ba et al. 2016) on the input and the
  recurrent gate pre-activations and on the cell state; ``batch``, batch norm at the same
  places with separate running statistics for every time step and scale/bias shared over
  time (Cooijmans et al. 2016). The per-step statistics live in ``batch_stats`` with a
  leading time axis of the training length; :func:`statistics_for_length` stretches them to
  another length, reusing the last step's statistics beyond it.
- :class:`CharTransformer`: a decoder-only (causal) transformer, pre-norm with LayerNorm or
  RMSNorm, or post-norm with LayerNorm. Every residual addition and the norm after it are
  one :class:`jaxnorm.linen.AddAndNorm` call (``jaxnorm.add_and_norm``), which returns the
  normalized sum and the sum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnorm import linen as jnn

Array = jax.Array

LSTM_NORMS = ("none", "layer", "batch")
TRANSFORMER_NORMS = ("pre_layer", "pre_rms", "post_layer")
BATCH_NORM_GATE_SCALE = 0.1  # Cooijmans et al.: gate BN scale starts at 0.1, not 1


class LSTMCell(nn.Module):
    r"""One LSTM step with an optional norm on the gates and the cell state.

    .. math::
        (i, f, g, o) = N_x(W_x x_t) + N_h(W_h h_{t-1}) + b, \quad
        c_t = \sigma(f) c_{t-1} + \sigma(i) \tanh(g), \quad h_t = \sigma(o) \tanh(N_c(c_t))

    with :math:`N_x, N_h, N_c` the identity (``none``), LayerNorm over the features
    (``layer``; :math:`N_x, N_h` without bias, :math:`b` takes its place) or BatchNorm over
    the batch (``batch``; gate scales start at 0.1). The forget-gate bias starts at 1.

    Attributes:
      hidden: size of :math:`h` and :math:`c`.
      norm: one of :data:`LSTM_NORMS`.
      train: BatchNorm uses batch statistics and updates its running ones when ``True``.
      momentum: BatchNorm's running-average momentum (Flax convention).
    """

    hidden: int
    norm: str = "none"
    train: bool = False
    momentum: float = 0.9

    def _normalize(self, x: Array, name: str, *, gate: bool) -> Array:
        """``x`` through this cell's norm named ``name``; ``gate``: a gate pre-activation."""
        if self.norm == "none":
            return x
        if self.norm == "layer":
            return jnn.LayerNorm(use_bias=not gate, name=name)(x)
        scale_init = nn.initializers.constant(BATCH_NORM_GATE_SCALE) if gate else nn.ones
        return jnn.BatchNorm(
            use_running_average=not self.train, momentum=self.momentum, use_bias=not gate,
            scale_init=scale_init, name=name,
        )(x)

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], x: Array) -> tuple[tuple[Array, Array], Array]:
        """``((c, h), x_t) -> ((c_t, h_t), h_t)`` for a batch: ``x`` is ``(N, features)``."""
        cell, hidden = carry
        width = 4 * self.hidden
        from_input = nn.Dense(width, use_bias=False, name="input")(x)
        from_hidden = nn.Dense(width, use_bias=False, name="recurrent")(hidden)
        forget_bias = jnp.zeros((width,)).at[self.hidden : 2 * self.hidden].set(1.0)
        bias = self.param("bias", lambda key, shape: forget_bias, (width,))
        gates = (
            self._normalize(from_input, "input_norm", gate=True)
            + self._normalize(from_hidden, "recurrent_norm", gate=True)
            + bias
        )
        input_gate, forget_gate, candidate, output_gate = jnp.split(gates, 4, axis=-1)
        cell = nn.sigmoid(forget_gate) * cell + nn.sigmoid(input_gate) * jnp.tanh(candidate)
        hidden = nn.sigmoid(output_gate) * jnp.tanh(self._normalize(cell, "cell_norm", gate=False))
        return (cell, hidden), hidden


# Over time: parameters shared by every step, BatchNorm's running statistics one per step.
ScannedLSTMCell = nn.scan(
    LSTMCell,
    variable_axes={"batch_stats": 0},
    variable_broadcast="params",
    split_rngs={"params": False},
    in_axes=1,
    out_axes=1,
)


class CharLSTM(nn.Module):
    """Embedding → LSTM over time (``nn.scan``) → linear read-out to next-character logits.

    Attributes:
      vocab_size: number of token ids.
      norm: one of :data:`LSTM_NORMS`.
      embed: embedding width.
      hidden: LSTM state size.
      momentum: the per-step BatchNorms' running-average momentum.
    """

    vocab_size: int
    norm: str = "none"
    embed: int = 32
    hidden: int = 128
    momentum: float = 0.9

    @nn.compact
    def __call__(self, tokens: Array, train: bool) -> Array:
        """``(N, T)`` tokens → ``(N, T, vocab_size)`` logits; the state starts at zero."""
        if self.norm not in LSTM_NORMS:
            raise ValueError(f"norm must be one of {LSTM_NORMS}, got {self.norm!r}")
        inputs = nn.Embed(self.vocab_size, self.embed, name="embed")(tokens)
        zeros = jnp.zeros((tokens.shape[0], self.hidden), inputs.dtype)
        cell = ScannedLSTMCell(
            hidden=self.hidden, norm=self.norm, train=train, momentum=self.momentum, name="lstm"
        )
        _, hidden = cell((zeros, zeros), inputs)
        return nn.Dense(self.vocab_size, name="readout")(hidden)


def statistics_for_length(batch_stats: Any, length: int) -> Any:
    """Per-step running statistics ``(T, ...)`` stretched to ``length`` steps: step ``t``
    uses the statistics of step ``min(t, T - 1)``, so steps beyond training's ``T`` reuse
    the last trained step's (Cooijmans et al.'s choice); shorter lengths take the first
    ``length`` steps.

    Args:
      batch_stats: the ``batch_stats`` collection of a :class:`CharLSTM` with ``norm="batch"``
        (every leaf has the time axis first); an empty tree passes through.
      length: the number of steps to evaluate.
    """
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")

    def stretch(statistic: Array) -> Array:
        steps = jnp.minimum(jnp.arange(length), statistic.shape[0] - 1)
        return jnp.take(statistic, steps, axis=0)

    return jax.tree.map(stretch, batch_stats)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` sees positions ``<= t``.

    Attributes:
      heads: number of attention heads (divides the width).
    """

    heads: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(N, T, width) -> (N, T, width)``."""
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        return nn.MultiHeadDotProductAttention(self.heads, deterministic=True)(x, mask=mask)


class FeedForward(nn.Module):
    """``Dense(4·width) → GELU → Dense(width)``, applied at every position."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(..., width) -> (..., width)``."""
        width = x.shape[-1]
        return nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(x)))


class CharTransformer(nn.Module):
    r"""A decoder-only transformer over characters with learned positions up to ``max_len``.

    Pre-norm (``pre_layer``, ``pre_rms``): :math:`h \leftarrow h + F(N(h))` for every
    sublayer :math:`F` (attention, feed-forward), and a final :math:`N` before the read-out;
    each norm after an addition is one :class:`jaxnorm.linen.AddAndNorm` with it. Post-norm
    (``post_layer``, the original transformer): :math:`h \leftarrow N(h + F(h))`.

    Attributes:
      vocab_size: number of token ids.
      norm: one of :data:`TRANSFORMER_NORMS`.
      max_len: the longest sequence (number of learned positions).
      width: model width.
      depth: number of blocks (attention + feed-forward each).
      heads: attention heads.
    """

    vocab_size: int
    norm: str = "pre_layer"
    max_len: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4

    def _norm(self, index: int) -> nn.Module:
        """The ``index``-th norm layer: RMSNorm for ``pre_rms``, LayerNorm otherwise."""
        if self.norm == "pre_rms":
            return jnn.RMSNorm(name=f"norm_{index}")
        return jnn.LayerNorm(name=f"norm_{index}")

    def _add_and_norm(self, index: int) -> nn.Module:
        """The ``index``-th norm, after a residual addition: ``(norm(x + r), x + r)`` in one
        call (the same ``scale``/``bias`` parameters as :meth:`_norm`'s layer)."""
        kind = "rms" if self.norm == "pre_rms" else "layer"
        return jnn.AddAndNorm(kind=kind, name=f"norm_{index}")

    @nn.compact
    def __call__(self, tokens: Array, train: bool) -> Array:
        """``(N, T)`` tokens, ``T <= max_len`` → ``(N, T, vocab_size)`` logits."""
        del train  # no dropout and no batch statistics
        if self.norm not in TRANSFORMER_NORMS:
            raise ValueError(f"norm must be one of {TRANSFORMER_NORMS}, got {self.norm!r}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens has {tokens.shape[1]} positions, max_len is {self.max_len}")
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (self.max_len, self.width)
        )
        stream = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
        stream = stream + positions[: tokens.shape[1]]
        sublayers = [
            layer
            for block in range(self.depth)
            for layer in (
                CausalSelfAttention(self.heads, name=f"attention_{block}"),
                FeedForward(name=f"feed_forward_{block}"),
            )
        ]
        pre_norm = self.norm.startswith("pre")
        normalized = self._norm(0)(stream) if pre_norm else stream
        for index, sublayer in enumerate(sublayers, start=1):
            update = sublayer(normalized if pre_norm else stream)
            normalized, summed = self._add_and_norm(index)(update, stream)
            stream = summed if pre_norm else normalized
        return nn.Dense(self.vocab_size, name="readout")(normalized)

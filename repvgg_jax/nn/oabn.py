"""Outlier-Aware Batch Normalization (OABN).

A BatchNorm whose effective per-channel scale ``s = gamma / sqrt(var + eps)``
is bounded, so that the kernels produced by RepVGG's branch merge (which
multiplies every kernel by ``s``) carry no outliers.

This is our reconstruction of the OABN of "Outlier-Aware Training for Low-Bit
Quantization of Structural Re-Parameterized Networks" (arXiv 2402.07200) from
its abstract; the paper's exact formula is not public. The choices are
options:

* ``bound="clip"``: ``s -> clip(s, -tau, tau)``. Channels inside the bound
  are untouched; a clipped channel's ``gamma`` gets no gradient through the
  scale (its ``beta`` still does).
* ``bound="tanh"``: ``s -> tau * tanh(s / tau)``. Smooth, strictly
  monotone, gradient everywhere; shrinks every channel a little
  (by 1 - tanh(r)/r for ``r = s / tau``, ~1.3% at ``r = 0.2``).
* ``relative=False``: ``tau`` is an absolute bound.
* ``relative=True``: the bound is ``tau * median(|s|)`` over the layer's
  channels, so it adapts to the layer's own scale. The median is taken under
  ``stop_gradient``: it sets the threshold, it is not itself trained.

The same :func:`bound` is used in the training forward pass (batch
statistics), in eval (running statistics) and in :func:`repvgg_jax.merge`
(running statistics), so the merge is exact. The bound's settings are stored
in the ``batch_stats`` collection next to ``mean`` and ``var`` (``tau``,
``relative``, ``smooth``), so a checkpoint alone merges correctly.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

BOUNDS = ("clip", "tanh")
# Keys OABN adds to flax.linen.BatchNorm's batch_stats ("mean", "var").
BOUND_KEYS = ("tau", "relative", "smooth")


def bound_threshold(s: jax.Array, tau: jax.Array, relative: jax.Array) -> jax.Array:
  """The bound on |s| for one layer: ``tau`` or ``tau * median(|s|)``.

  Args:
    s: per-channel scales, shape ``(C,)``.
    tau: scalar, the bound or the multiplier of the median.
    relative: scalar bool, which of the two.
  """
  a = jnp.sort(jax.lax.stop_gradient(jnp.abs(s)))
  n = a.shape[-1]
  median = 0.5 * (a[(n - 1) // 2] + a[n // 2])  # jnp.median's graph compiles ~2x slower
  return jnp.where(relative, tau * median, tau)


def bound(s: jax.Array, stats: Mapping[str, Any]) -> jax.Array:
  """Bounds per-channel scales ``s`` with the settings stored in ``stats``.

  ``stats`` is an OABN ``batch_stats`` dict (``tau``, ``relative``,
  ``smooth``); a plain BatchNorm's stats (without them) leave ``s`` as is.
  Jit-able: the settings may be traced values.
  """
  if "tau" not in stats:
    return s
  t = bound_threshold(s, stats["tau"], stats["relative"])
  clipped = jnp.clip(s, -t, t)
  # Guard t == 0 (a layer of all-zero gammas): tanh form degenerates to 0.
  safe_t = jnp.where(t > 0, t, 1.0)
  smooth = jnp.where(t > 0, safe_t * jnp.tanh(s / safe_t), 0.0)
  return jnp.where(stats["smooth"], smooth, clipped)


def scale_shift(params: Mapping[str, Any], stats: Mapping[str, Any],
                epsilon: float) -> tuple[jax.Array, jax.Array]:
  """The affine map ``y = x * s + shift`` of a BN/OABN layer in eval mode.

  ``s = bound(gamma / sqrt(var + eps))`` and ``shift = beta - mean * s``.
  """
  s = bound(params["scale"] * jax.lax.rsqrt(stats["var"] + epsilon), stats)
  return s, params["bias"] - stats["mean"] * s


class OABN(nn.Module):
  """BatchNorm with a bounded effective scale, over the last axis (NHWC).

  Variables: ``params/{scale,bias}`` and ``batch_stats/{mean,var}`` as in
  :class:`flax.linen.BatchNorm`, plus ``batch_stats/{tau,relative,smooth}``
  (scalars holding the bound's settings; initialised from the attributes
  below, then read from the variables, which win).

  Attributes:
    use_running_average: eval mode (running statistics) when True.
    momentum: running-average decay (0.9 == PyTorch's momentum 0.1).
    epsilon: added to the variance.
    bound: ``"clip"`` or ``"tanh"``.
    tau: the bound, or its multiple of the layer's median ``|s|`` when
      ``relative``.
    relative: see ``tau``.
    dtype: output dtype (statistics are always computed in float32).
    param_dtype: dtype of ``scale`` and ``bias``.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  bound: str = "tanh"
  tau: float = 4.0
  relative: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  def __post_init__(self):
    if self.bound not in BOUNDS:
      raise ValueError(f"OABN bound={self.bound!r}: expected one of {BOUNDS}")
    if not self.tau > 0:
      raise ValueError(f"OABN tau={self.tau!r}: must be > 0")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    settings = {
        "tau": self.variable("batch_stats", "tau",
                             lambda: jnp.asarray(self.tau, jnp.float32)).value,
        "relative": self.variable("batch_stats", "relative",
                                  lambda: jnp.asarray(self.relative)).value,
        "smooth": self.variable("batch_stats", "smooth",
                                lambda: jnp.asarray(self.bound == "tanh")).value,
    }

    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var

    s = bound(scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon), settings)
    # (x - mean) * s, not x * s - mean * s: no cancellation when |mean| >> std.
    y = (x32 - mean) * s + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)

"""Outlier-Aware Batch Normalization (OABN), and the model's one BatchNorm.

A BatchNorm whose effective per-channel scale ``s = gamma / sqrt(var + eps)``
is bounded, so that the kernels produced by RepVGG's branch merge (which
multiplies every kernel by ``s``) carry no outliers. ``norm="bn"`` is the same
module without a bound (``form=None``), whose statistics and normalization are
``flax.linen.BatchNorm``'s op for op (the forward pass and the running statistics are
flax's bit for bit; the backward pass agrees to float32 rounding), so a BN-vs-OABN
comparison differs only by the bound.
Everything OABN is here: the bounds, the module, the form a model gets by depth and
the tau it gets by form (:func:`resolve_bound`, the one place every caller asks).

This is our reconstruction of the OABN of "Outlier-Aware Training for Low-Bit
Quantization of Structural Re-Parameterized Networks" (arXiv 2402.07200) from
its abstract; the paper's exact formula is not public. The choices are
options (docs/oabn.md derives them and gives the numbers):

* ``form="median"``: each BN bounds its own scales,
  ``|s| <= tau * median(|s|)`` over the layer's channels (``relative=True``)
  or ``|s| <= tau`` (``relative=False``), see :func:`bound`.
* ``form="branch"``: the block bounds, per output channel, the taps the 1x1
  and identity branches add to the centre of the merged kernel relative to the
  3x3 branch's spread in the same channel, see :func:`branch_bound`. The BN
  layers themselves are then plain BNs (:class:`OABN` with ``form="branch"``
  hands the block its raw scale).
* ``bound="clip"``: hard, a clipped channel's gradient through the scale is 0;
  ``bound="tanh"``: ``t * tanh(x / t)``, smooth, gradient everywhere, shrinks
  every value a little (by ``1 - tanh(r)/r``, ~1.3% at ``r = x / t = 0.2``).

Thresholds are taken under ``stop_gradient``: they are set by the weights,
not trained. The same functions run in the training forward pass (batch
statistics), in eval and in :func:`repvgg_jax.merge` (running statistics), so
the merge is exact. The settings come from the module's attributes (the model
config); a copy is stored in the ``settings`` collection (``tau``, ``relative``,
``smooth`` per BN for ``median``; ``bound_tau``, ``bound_smooth`` per block for
``branch``) so that a checkpoint alone merges, and
:func:`repvgg_jax.models.settings.check_settings` refuses variables whose copy
disagrees with the model. They are constants, not statistics: ``batch_stats``
holds only the running means and variances, so nothing that averages, EMAs or
syncs statistics touches them.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

BOUNDS = ("clip", "tanh")
FORMS = ("median", "branch")
# The tau a model uses when none is given, per form (docs/oabn.md: the study's choices).
DEFAULT_TAU = {"median": 4.0, "branch": 3.0}
# OABN's form by depth (docs/oabn.md, "At full depth"): ``branch`` up to this many blocks in
# every stage (measured better than ``median`` at 4, the demo network), ``median`` deeper
# (measured better at A0's 14); depths between are untested.
BRANCH_MAX_BLOCKS = 4


def resolve_bound(form: str | None, tau: float | None, blocks: Any,
                  block: str = "repvgg") -> tuple[str, float]:
  """The OABN ``(form, tau)`` a model with ``blocks`` per stage and ``block`` style uses:
  ``form``, or when None the depth's (``branch`` when no stage has more than
  ``BRANCH_MAX_BLOCKS`` blocks, else ``median``; always ``median`` for
  ``block="qarepvgg"``, which has no branches to bound); ``tau``, or when None the
  form's ``DEFAULT_TAU``. The model, the config and the report all ask here."""
  if form is None:
    form = "branch" if block == "repvgg" and max(blocks) <= BRANCH_MAX_BLOCKS else "median"
  return form, DEFAULT_TAU[form] if tau is None else tau
# The collection of constants a train-form model records for merge (never trained, never
# averaged): the bounds' settings, the QARepVGG identity gain.
SETTINGS = "settings"
# Keys an OABN with form="median" keeps in its settings.
BOUND_KEYS = ("tau", "relative", "smooth")
# Keys a block with form="branch" keeps in its own settings.
BRANCH_KEYS = ("bound_tau", "bound_smooth")


def check_tau(tau: Any, what: str = "tau") -> None:
  """ValueError naming ``what`` unless ``tau`` is a number > 0."""
  if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
    raise ValueError(f"{what}={tau!r}: must be > 0")


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


def _limit(x: jax.Array, t: jax.Array, smooth: jax.Array) -> jax.Array:
  """``clip(x, -t, t)`` or ``t * tanh(x / t)``; ``t == 0`` gives 0 (both forms)."""
  safe_t = jnp.where(t > 0, t, 1.0)
  return jnp.where(smooth, jnp.where(t > 0, safe_t * jnp.tanh(x / safe_t), 0.0),
                   jnp.clip(x, -t, t))


def bound(s: jax.Array, stats: Mapping[str, Any]) -> jax.Array:
  """Bounds per-channel scales ``s`` with the ``median`` settings in ``stats``.

  ``stats`` holds ``tau``, ``relative`` and ``smooth`` (an OABN's
  ``batch_stats``, or the settings of its attributes); without them (a plain
  BatchNorm's stats) ``s`` is returned as is. Jit-able: the settings may be
  traced values.
  """
  if "tau" not in stats:
    return s
  return _limit(s, bound_threshold(s, stats["tau"], stats["relative"]), stats["smooth"])


def branch_bound(s3: jax.Array, k3: jax.Array, s1: jax.Array, k1: jax.Array,
                 s_id: jax.Array | None, tau: Any, smooth: Any) -> tuple[jax.Array, Any]:
  """The ``branch`` bound: the scales of the 1x1 and identity branches, shrunk
  per output channel so that the taps they add to the merged kernel's centre
  stay within ``tau`` times the 3x3 branch's rms in the same channel.

  For output channel ``o`` (HWIO kernels, ``i`` over ``Cin/groups``)::

    r3[o]   = rms(s3[o] * K3[..., o])                       (stop_gradient)
    e[i, o] = s1[o] * K1[0, 0, i, o] + s_id[o] * [i == o % (Cin/groups)]
    m[o]    = max_i |e[i, o]|
    f[o]    = limit(m[o], tau * r3[o]) / m[o]               (1 where m = 0)
    s1'     = f * s1;   s_id' = f * s_id

  ``limit`` is the clip or tanh of :func:`bound`. One factor per channel for
  both branches keeps their ratio (and the direction of their sum); the
  merged centre tap is then at most ``|s3 K3 centre| + tau * r3``, so the
  channel's max/rms is bounded by the 3x3 branch's own plus ``tau``. A channel
  whose 3x3 branch is all zero has no reference and is left unbounded.

  Args:
    s3, s1: ``(C,)`` raw scales of the 3x3 and 1x1 BNs.
    k3, k1: the 3x3 and 1x1 HWIO kernels.
    s_id: ``(C,)`` raw scale of the identity BN, or None (no identity branch).
    tau, smooth: the bound's multiple and clip (False) or tanh (True).
  Returns:
    ``(s1', s_id')`` (``s_id'`` None when ``s_id`` is).
  """
  cin_g, cout = k1.shape[2:]
  r3 = jax.lax.stop_gradient(
      jnp.abs(s3) * jnp.sqrt(jnp.mean(jnp.square(k3.astype(jnp.float32)), axis=(0, 1, 2))))
  taps = s1 * k1[0, 0].astype(jnp.float32)
  if s_id is not None:
    taps = taps + s_id * (jnp.arange(cin_g)[:, None] == jnp.arange(cout) % cin_g)
  m = jnp.max(jnp.abs(taps), axis=0)
  t = tau * r3
  safe_m = jnp.where(m > 0, m, 1.0)
  f = jnp.where((m > 0) & (t > 0), _limit(m, t, smooth) / safe_m, 1.0)
  return s1 * f, (None if s_id is None else s_id * f)


def bn_scale(params: Mapping[str, Any], stats: Mapping[str, Any], epsilon: float) -> jax.Array:
  """A BN layer's effective per-channel scale ``gamma / sqrt(var + eps)``, unbounded: what
  the merge multiplies a kernel by (OABN bounds it: :func:`scale_shift`)."""
  return params["scale"] * jax.lax.rsqrt(stats["var"] + epsilon)


def scale_shift(params: Mapping[str, Any], stats: Mapping[str, Any], epsilon: float,
                scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The affine map ``y = x * s + shift`` of a BN/OABN layer in eval mode.

  ``s = bound(gamma / sqrt(var + eps))`` and ``shift = beta - mean * s``;
  ``scale`` given: ``s = scale`` (a scale bounded elsewhere, e.g. by
  :func:`branch_bound`).
  """
  s = bound(bn_scale(params, stats, epsilon), stats) if scale is None else scale
  return s, params["bias"] - stats["mean"] * s


class OABN(nn.Module):
  """BatchNorm with a bounded effective scale, over the last axis (NHWC).

  Variables: ``params/{scale,bias}`` and ``batch_stats/{mean,var}`` as in
  :class:`flax.linen.BatchNorm`; with ``form="median"`` also
  ``settings/{tau,relative,smooth}``, scalars recording the bound's
  settings for :func:`repvgg_jax.merge` (the forward pass uses the attributes).

  Attributes:
    use_running_average: eval mode (running statistics) when True.
    momentum: running-average decay (0.9 == PyTorch's momentum 0.1).
    epsilon: added to the variance.
    form: ``"median"`` (this layer bounds its scales), ``"branch"`` (it does
      not: the RepVGG block bounds them, see :func:`branch_bound`), or None: no
      bound anywhere, a plain BatchNorm (the model's ``norm="bn"``).
    bound: ``"clip"`` or ``"tanh"``.
    tau: the bound, or its multiple of the layer's median ``|s|`` when
      ``relative`` (``median`` form only).
    relative: see ``tau``.
    dtype: output dtype (statistics are always computed in float32).
    param_dtype: dtype of ``scale`` and ``bias``.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  form: str | None = "median"
  bound: str = "tanh"
  tau: float = 4.0
  relative: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  def __post_init__(self):
    if self.form is not None and self.form not in FORMS:
      raise ValueError(f"OABN form={self.form!r}: expected one of {FORMS} or None")
    if self.bound not in BOUNDS:
      raise ValueError(f"OABN bound={self.bound!r}: expected one of {BOUNDS}")
    check_tau(self.tau, "OABN tau")
    super().__post_init__()

  def settings(self) -> dict[str, jax.Array]:
    """The ``median`` bound's settings from the attributes, as :func:`bound` takes them."""
    return {"tau": jnp.asarray(self.tau, jnp.float32), "relative": jnp.asarray(self.relative),
            "smooth": jnp.asarray(self.bound == "tanh")}

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               raw: bool = False) -> Any:
    """``y = (x - mean) * s + beta`` (``s`` bounded with ``form="median"``).

    ``raw=True`` returns the pieces instead, float32: ``(x - mean, s, beta)``
    with ``s`` the unbounded scale (the ``branch`` form's block bounds it).
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    settings = {}
    if self.form == "median":
      settings = self.settings()
      for k, v in settings.items():
        self.variable(SETTINGS, k, lambda v=v: v)

    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # flax.linen.BatchNorm's statistics, op for op (E[x^2] - E[x]^2, clipped at 0): a
      # BN of this module is flax's BatchNorm bit for bit (tested), and OABN is that BN
      # with a bound.
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.maximum(0.0, jnp.mean(jax.lax.square(x32), axis=axes) - jax.lax.square(mean))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var

    s = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)  # flax's order
    # (x - mean) * s, not x * s - mean * s: no cancellation when |mean| >> std.
    if raw:
      return x32 - mean, s, bias.astype(jnp.float32)
    y = (x32 - mean) * bound(s, settings) + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)

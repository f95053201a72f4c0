"""Uniform quantization: integer grids, min-max and MSE-optimal steps, LSQ fake-quant.

A uniform quantizer of ``b`` bits maps ``x`` to ``k * step`` with the integer
``k`` in ``[qmin, qmax]``: signed ``[-2^(b-1), 2^(b-1) - 1]`` (weights, the
network input), unsigned ``[0, 2^b - 1]`` (activations after a ReLU). Every
grid has ``2^b`` distinct levels, as int8 hardware has.

* :func:`fake_quant`: ``round(clip(x / step, qmin, qmax)) * step`` with a
  straight-through gradient for ``x`` (zero outside the range) and LSQ's
  gradient for ``step`` (Esser et al. 2020), scaled. The one
  uniform quantizer of the package: weights (``method="lsq"``) and
  activations both call it.
* :func:`minmax_step`, :func:`mse_step`: the step from the weights alone
  (per tensor or per output channel).
* :func:`grid`: the levels of a step as a codebook, so uniform quantizers
  share the codebook machinery (``quantize``, export).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CLIPPINGS = ("minmax", "mse")
# Clip candidates of the MSE search, as fractions of max |x|.
MSE_CANDIDATES = np.linspace(0.05, 1.0, 96, dtype=np.float32)


def check_uniform_bits(bits: int, what: str = "bits") -> int:
  """Uniform grids need a zero and a sign: bits in 2..8, else ValueError naming it."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
    raise ValueError(f"{what}={bits!r}: expected an int in 2..8 for a uniform quantizer")
  return int(bits)


def int_range(bits: int, signed: bool) -> tuple[int, int]:
  """``(qmin, qmax)`` of a ``bits``-bit integer."""
  return (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def fake_quant(x: jax.Array, step: jax.Array, qmin: int, qmax: int,
               step_grad_scale: float = 1.0) -> jax.Array:
  """``round(clip(x / step, qmin, qmax)) * step``, ``step`` a scalar or one
  value per channel of the last axis of ``x``.

  Gradients: ``x`` straight through inside the range, 0 outside; ``step``
  (LSQ) ``round(x / s) - x / s`` inside, ``qmin`` / ``qmax`` below / above,
  summed over the values that share the step and times ``step_grad_scale``
  (LSQ uses ``1 / sqrt(N * qmax)``, N the number of those values).
  """
  return int_values(x, step, qmin, qmax) * step


def _fake_quant_fwd(x, step, qmin, qmax, step_grad_scale):
  return fake_quant(x, step, qmin, qmax, step_grad_scale), (x, step)


def _fake_quant_bwd(qmin, qmax, step_grad_scale, res, g):
  x, step = res
  v = x / step
  inside = (v >= qmin) & (v <= qmax)
  gx = jnp.where(inside, g, jnp.zeros_like(g))
  ds = jnp.where(inside, jnp.round(v) - v, jnp.where(v < qmin, qmin, qmax).astype(v.dtype))
  gs = jnp.sum(ds * g, axis=tuple(range(x.ndim - jnp.ndim(step))))
  return gx, (gs * step_grad_scale).reshape(jnp.shape(step)).astype(step.dtype)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def learned_step(step: jax.Array) -> jax.Array:
  """The step a learned (LSQ) step variable stands for: ``max(|s|, 1e-12)``. SGD
  can push a small step through zero; its magnitude is what the grid uses, so
  the grid stays sorted and the export matches the forward."""
  return jnp.maximum(jnp.abs(step), np.float32(1e-12))


def lsq_grad_scale(count: int, qmax: int) -> float:
  """LSQ's step gradient scale ``1 / sqrt(N * qmax)`` for ``N`` values per step."""
  return float(1.0 / np.sqrt(max(count, 1) * qmax))


def int_values(x: jax.Array, step: jax.Array, qmin: int, qmax: int) -> jax.Array:
  """The integers ``k`` of :func:`fake_quant` (float dtype of ``x``)."""
  return jnp.round(jnp.clip(x / step, qmin, qmax))


def grid(step: jax.Array, bits: int, signed: bool = True) -> jax.Array:
  """The ``2^bits`` levels ``k * step`` as a sorted codebook: ``(K,)`` for a
  scalar step, ``(Cout, K)`` for a per-channel step ``(Cout,)``."""
  qmin, qmax = int_range(bits, signed)
  ks = np.arange(qmin, qmax + 1, dtype=np.float32)
  return jnp.asarray(step)[..., None] * ks


def _channels(w: jax.Array, per_channel: bool) -> jax.Array:
  return w.reshape(-1, w.shape[-1]) if per_channel else w.reshape(-1, 1)


def minmax_step(w: jax.Array, bits: int, per_channel: bool, signed: bool = True) -> jax.Array:
  """``max|w| / qmax``: the largest value is the top level (the naive baseline)."""
  _, qmax = int_range(bits, signed)
  a = jnp.max(jnp.abs(_channels(w, per_channel)), axis=0)
  # A multiply by a NumPy constant: the same float32 in and out of jit (XLA may
  # turn a division by a constant into a multiply), so export reproduces apply.
  step = jnp.maximum(a, jnp.finfo(jnp.float32).tiny) * np.float32(1 / qmax)
  return step if per_channel else step[0]


def mse_step(w: jax.Array, bits: int, per_channel: bool, signed: bool = True) -> jax.Array:
  """The step whose grid has the least squared error on ``w`` among clips at
  ``MSE_CANDIDATES`` times ``max|w|`` (per output channel or per tensor)."""
  qmin, qmax = int_range(bits, signed)
  cols = _channels(jnp.asarray(w, jnp.float32), per_channel)
  top = jnp.maximum(jnp.max(jnp.abs(cols), axis=0), jnp.finfo(jnp.float32).tiny)

  top = top * np.float32(1 / qmax)

  def err(frac):
    s = frac * top
    return jnp.sum(jnp.square(int_values(cols, s, qmin, qmax) * s - cols), axis=0)

  errs = jax.lax.map(err, jnp.asarray(MSE_CANDIDATES))          # (candidates, C)
  step = jnp.asarray(MSE_CANDIDATES)[jnp.argmin(errs, axis=0)] * top
  return step if per_channel else step[0]

"""Codebook quantizer: nearest-level assignment and a straight-through quantize.

A codebook is sorted float32 levels ``(K,)`` (per tensor) or ``(Cout, K)``
(per output channel = the last axis of the weight, HWIO convs and
``(in, out)`` dense kernels), with ``K = 2^bits``, ``bits`` in 1..8.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.quant.levels import decode, nearest_index, nearest_level  # noqa: F401 (decode: re-exported)


def check_codebook(w, codebook) -> int:
  """Validates a codebook against weight ``w``; returns its bit width.

  Raises ValueError naming the bad value: length not ``2^bits`` for bits in
  1..8, per-channel rows not matching ``w.shape[-1]``, or (when concrete) a
  codebook that is not sorted along its last axis.
  """
  shape = jnp.shape(codebook)
  if len(shape) not in (1, 2):
    raise ValueError(f"codebook has shape {shape}: expected (K,) or (Cout, K)")
  k = shape[-1]
  bits = int(k).bit_length() - 1
  if k < 2 or 2 ** bits != k or bits > 8:
    raise ValueError(f"codebook length {k}: expected 2^bits levels with bits in 1..8")
  if len(shape) == 2 and (jnp.ndim(w) == 0 or shape[0] != jnp.shape(w)[-1]):
    raise ValueError(f"per-channel codebook of shape {shape} does not match kernel of shape "
                     f"{jnp.shape(w)}: expected ({jnp.shape(w)[-1] if jnp.ndim(w) else '?'}, {k})")
  if not isinstance(codebook, jax.core.Tracer):
    c = np.asarray(codebook)
    bad = np.argwhere(np.diff(c, axis=-1) < 0)
    if bad.size:
      raise ValueError(f"codebook is not sorted: entries {bad[0].tolist()} and the next "
                       f"decrease ({c.reshape(-1, k)[0 if c.ndim == 1 else bad[0][0]]})")
  return bits


def assign(w: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest level for every weight (int32, shape of ``w``).

  Ties (a weight exactly on a midpoint) go to the lower level.
  """
  check_codebook(w, codebook)
  return nearest_index(w, codebook)


@jax.custom_vjp
def _ste(w, codebook):
  return nearest_level(w, codebook).astype(w.dtype)


def _ste_fwd(w, codebook):
  return _ste(w, codebook), codebook


def _ste_bwd(codebook, g):
  # Codebooks are refitted by k-means, not trained by gradient.
  return g, jnp.zeros_like(codebook)


_ste.defvjp(_ste_fwd, _ste_bwd)


def quantize(w: jax.Array, codebook: jax.Array) -> jax.Array:
  """Straight-through codebook quantizer.

  Forward: ``decode(assign(w, codebook), codebook)`` (exact, same dtype as
  ``w``). Backward: the gradient passes straight to ``w`` (identity); the
  codebook gets a zero gradient.
  """
  check_codebook(w, codebook)
  return _ste(w, codebook)


def int8_scale(codebook: jax.Array) -> jax.Array:
  """Per-row scale of the int8 grid a codebook is snapped to: ``max|c| / 127``
  (``()`` per tensor, ``(Cout,)`` per channel)."""
  a = jnp.max(jnp.abs(codebook), axis=-1)
  return jnp.maximum(a, jnp.finfo(jnp.float32).tiny) / 127.0


def snap_to_int8(codebook: jax.Array) -> jax.Array:
  """Each level moved to the nearest ``scale * k``, ``k`` an int8 in [-127, 127]:
  still sorted; neighbouring levels may merge."""
  s = int8_scale(codebook)[..., None]
  return jnp.round(codebook / s) * s

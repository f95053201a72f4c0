"""Uniform baselines: the symmetric min-max grid and post-training quantization.

* :func:`uniform_codebook`: the symmetric min-max grid of a kernel expressed
  as a codebook, so uniform and k-means quantization share ``quantize`` and
  the packed export. Uniform QAT (``make_quantizer("uniform", ...)``)
  recomputes it from the weights on every ``apply`` (straight-through
  gradient; the step follows ``max|w|``, it is not learned).
* :func:`ptq`: post-training uniform quantization of deploy params, with the
  same layer rules as :class:`~repvgg_jax.quant.Quantizer`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def uniform_codebook(w: jax.Array, bits: int, per_channel: bool) -> jax.Array:
  """Symmetric min-max grid as a sorted codebook of ``2^bits`` levels:
  ``k * max|w| / (2^(b-1) - 1)`` for ``|k| <= 2^(b-1) - 1`` (the lowest level
  repeated once to fill ``2^bits``); ``{-max|w|, +max|w|}`` at 1 bit."""
  a = jnp.abs(w).reshape(-1, w.shape[-1]).max(axis=0) if per_channel else jnp.abs(w).max()
  a = jax.lax.stop_gradient(a)
  # One multiply per level by a constant computed in NumPy: the same float32
  # values in and out of jit, so export reproduces apply bit for bit.
  if bits == 1:
    steps = np.array([-1.0, 1.0], np.float32)
  else:
    qmax = 2 ** (bits - 1) - 1
    steps = (np.arange(-qmax - 1, qmax + 1).clip(-qmax) / qmax).astype(np.float32)
  return a[..., None] * steps if per_channel else a * steps


def ptq(params: Mapping[str, Any], bits: int = 8, granularity: str = "channel",
        first_last_bits: int | None = 8) -> dict[str, Any]:
  """Post-training min-max symmetric uniform quantization of deploy params.

  Every kernel the quantizer selects (SE layers skipped; ``stem``/``head`` at
  ``first_last_bits``, or at ``bits`` when it is None) is replaced by its
  nearest level on the grid of :func:`uniform_codebook`, per output channel
  or per tensor; biases and skipped layers are returned unchanged. Returns
  float params (dequantized values); ``export(params, make_quantizer("uniform",
  ...), {})`` packs the same values. Bad values raise ValueError naming them.
  """
  from repvgg_jax.quant import make_quantizer  # the layer rules live there
  q = make_quantizer("uniform", bits=bits, granularity=granularity,
                     first_last_bits=first_last_bits)
  return jax.jit(q.apply)(params, {})

"""Training penalties on the merged kernels: KURE and OABN's ``merged`` form.

Both act on what a deployment quantizer sees, the merged 3x3 kernel of each
block, computed from the train-form variables by :func:`repvgg_jax.merge` (the
merge is cheap and differentiable). The running statistics stand in for the
batch's: gradients reach the kernels and BN ``gamma``/``beta``, not the
variances (as in the official RepVGG's custom L2 of ``get_custom_L2``). A
penalty changes training only; the model, its merge and its deploy form are
those of the plain network.

* ``kure``: kurtosis regularization (Shkolnik et al., "Robust Quantization:
  One Model to Rule Them All", NeurIPS 2020), per merged kernel ``W_l``::

    R = mean_l (kurt(W_l) - target)^2,   kurt = E[(w - mu)^4] / sigma^4

  with ``target`` 1.8, the kurtosis of a uniform distribution (their choice).
* ``channel_max`` (OABN ``merged``, our reconstruction): per output channel
  ``o`` of each merged kernel, ``r = max|W[..., o]| / rms(W[..., o])`` (the
  outlier a per-channel quantizer sees, as in
  :func:`repvgg_jax.analysis.channel_outliers`)::

    R = mean_l mean_o relu(r_lo - target)^2

  with ``target`` (default 8) the ratio left free. Its gradient goes to the
  channel's largest weight and, through the rms, to all of them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from repvgg_jax.analysis import channel_ratio, kurtosis  # noqa: F401 (the measures penalized)
from repvgg_jax.reparam import merged_kernels

PENALTIES = ("none", "kure", "channel_max")
DEFAULT_TARGETS = {"kure": 1.8, "channel_max": 8.0}


def kure(kernels: list[jax.Array], target: float) -> jax.Array:
  return jnp.mean(jnp.stack([jnp.square(kurtosis(w) - target) for w in kernels]))


def channel_max(kernels: list[jax.Array], target: float) -> jax.Array:
  return jnp.mean(jnp.stack([jnp.mean(jnp.square(jax.nn.relu(channel_ratio(w) - target)))
                             for w in kernels]))


def make_penalty(name: str, target: float = 0.0) -> Callable[[Mapping[str, Any]], jax.Array] | None:
  """``f(variables) -> scalar`` for penalty ``name`` (None for ``"none"``).

  ``target`` 0 takes the penalty's default (:data:`DEFAULT_TARGETS`).
  """
  if name not in PENALTIES:
    raise ValueError(f"penalty={name!r}: expected one of {PENALTIES}")
  if name == "none":
    return None
  target = target or DEFAULT_TARGETS[name]
  fn = {"kure": kure, "channel_max": channel_max}[name]
  return lambda variables: fn(list(merged_kernels(variables).values()), target)

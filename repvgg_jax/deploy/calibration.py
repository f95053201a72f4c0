"""Activation calibration of a deploy model with ``act_bits``: min-max, percentile or MSE
steps from a few batches of normalized images."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repvgg_jax.models.repvgg import SIGNED_INPUT_LAYER, RepVGG
from repvgg_jax.quant import activation


def calibrate(model: RepVGG, variables: Mapping[str, Any], batches: Iterable[jax.Array], *,
              method: str = "minmax", percentile: float = 99.99) -> dict[str, Any]:
  """The ``quant`` collection of ``variables`` (``{}`` if it has none) plus the
  activation steps of a deploy model with ``act_bits``, calibrated on float NHWC
  ``batches`` (normalized images).

  ``variables["params"]`` are the (weight-quantized) params; activations are
  observed in float everywhere, and each layer's step is set from what its
  input looked like over all batches (``stem/act/step``, ...,
  ``head_act/step``).
  """
  if not model.act_bits:
    raise ValueError("calibrate: the model has act_bits=0 (float activations)")
  activation.check_calibration(method, percentile)
  params = {"params": variables["params"]}

  @jax.jit
  def observe(x):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
    quant = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["quant"])
    _, out = model.apply({**params, "quant": quant}, x, mutable=["intermediates"])
    return out["intermediates"]

  max_abs: dict[tuple, float] = {}
  samples: dict[tuple, list] = {}
  for x in batches:
    flat = traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(observe(x))))
    for path, (v,) in flat.items():
      layer = path[:-1]
      if path[-1] == "max_abs":
        max_abs[layer] = max(max_abs.get(layer, 0.0), float(v))
      else:
        samples.setdefault(layer, []).append(np.asarray(v))
  if not max_abs:
    raise ValueError("calibrate: no calibration batches")
  steps = traverse_util.flatten_dict(flax.core.unfreeze(variables.get("quant", {})))
  for layer in max_abs:
    signed = layer[0] == SIGNED_INPUT_LAYER
    steps[layer + ("step",)] = activation.calibrated_step(
        max_abs[layer], np.concatenate(samples[layer]), model.act_bits, signed, method,
        percentile)
  return traverse_util.unflatten_dict(steps)

"""Activation fake-quant: the input of every quantized conv and dense layer.

``ActQuant(bits, signed)`` computes ``round(clip(x / step, qmin, qmax)) *
step`` per tensor (``repvgg_jax.quant.uniform.fake_quant``): unsigned
``[0, 2^b - 1]`` after a ReLU, signed ``[-2^(b-1), 2^(b-1) - 1]`` for the
network input. The gradient passes straight through to ``x`` inside the
range; the step gets LSQ's gradient (scale ``1 / sqrt(N * qmax)``, N the
values per example), so QAT learns it.

Its one variable, ``step``, lives in the ``quant`` collection beside the
weight codebooks. Calibration: apply the model with
``mutable=["intermediates"]`` and every ``ActQuant`` passes its input through
in float and records ``max_abs`` and a fixed sample of its values
(``repvgg_jax.quant.activation`` turns them into steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from repvgg_jax.quant import uniform

# Values per batch recorded for calibration: fixed positions drawn once, spread
# over the batch, rows and channels (a plain stride can land on one channel).
SAMPLE_SIZE = 16384


def _sample_positions(size: int) -> np.ndarray:
  if size <= SAMPLE_SIZE:
    return np.arange(size)
  return np.sort(np.random.default_rng(size).choice(size, SAMPLE_SIZE, replace=False))


class ActQuant(nn.Module):
  """Per-tensor uniform fake-quant of an activation (see the module doc)."""
  bits: int
  signed: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    step = self.variable("quant", "step", lambda: jnp.ones((), jnp.float32))
    if self.is_mutable_collection("intermediates"):
      flat = x.reshape(-1).astype(jnp.float32)
      self.sow("intermediates", "max_abs", jnp.max(jnp.abs(flat)))
      self.sow("intermediates", "sample", flat[_sample_positions(flat.size)])
      return x
    qmin, qmax = uniform.int_range(self.bits, self.signed)
    scale = uniform.lsq_grad_scale(int(np.prod(x.shape[1:])), qmax)
    return uniform.fake_quant(x.astype(jnp.float32), uniform.learned_step(step.value), qmin,
                              qmax, scale).astype(x.dtype)

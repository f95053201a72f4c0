"""Activation quantization: the fake-quant layer at the input of every quantized conv and
dense layer, and its calibration.

``ActQuant(bits, signed)`` computes ``round(clip(x / step, qmin, qmax)) * step`` per
tensor (:func:`repvgg_jax.quant.uniform.fake_quant`): unsigned ``[0, 2^b - 1]`` after a
ReLU, signed ``[-2^(b-1), 2^(b-1) - 1]`` for the network input. The gradient passes
straight through to ``x`` inside the range; the step gets LSQ's gradient (scale
``1 / sqrt(N * qmax)``, N the values per example), so QAT learns it. Its one variable,
``step``, lives in the ``quant`` collection beside the weight codebooks.

Calibration: apply the model with ``mutable=["intermediates"]`` and every ``ActQuant``
passes its input through in float and records, per batch, the largest ``|x|`` and a
fixed sample of values. :func:`calibrated_step` turns what was recorded over all
batches into a step:

* ``minmax``: ``max|x| / qmax``, nothing clipped (the naive baseline);
* ``percentile``: the ``percentile``-th percentile of ``|x|`` over the sample
  is the top level (outliers beyond it are clipped);
* ``mse``: the clip with the least squared quantization error on the sample
  (:func:`repvgg_jax.quant.uniform.mse_step`).
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


CALIBRATIONS = ("minmax", "percentile", "mse")


def check_act_bits(bits: int) -> int:
  """Returns ``bits`` if it is 0 (float activations) or an int in 2..8, else raises
  ValueError naming it."""
  if isinstance(bits, int) and not isinstance(bits, bool) and bits == 0:
    return 0
  try:
    return uniform.check_uniform_bits(bits, "act_bits")
  except ValueError as e:
    raise ValueError(f"{e} (or 0: float activations)") from None


def check_calibration(method: str, percentile: float = 99.99) -> None:
  """ValueError naming ``act_calibration`` or ``act_percentile`` when it is out of range."""
  if method not in CALIBRATIONS:
    raise ValueError(f"act_calibration={method!r}: expected one of {CALIBRATIONS}")
  if not 50.0 < percentile <= 100.0:
    raise ValueError(f"act_percentile={percentile!r}: expected a value in (50, 100]")


def calibrated_step(max_abs: float, sample: np.ndarray, bits: int, signed: bool,
                    method: str, percentile: float = 99.99) -> np.float32:
  """The step of a ``bits``-bit (signed or unsigned) per-tensor quantizer."""
  check_calibration(method, percentile)
  uniform.check_uniform_bits(bits, "act_bits")
  _, qmax = uniform.int_range(bits, signed)
  sample = np.asarray(sample, np.float32).ravel()
  if method == "minmax":
    top = float(max_abs)
  elif method == "percentile":
    top = float(np.percentile(np.abs(sample), percentile))
  else:
    return np.float32(uniform.mse_step(sample, bits, per_channel=False, signed=signed))
  return np.float32(max(top, float(np.finfo(np.float32).tiny)) / qmax)

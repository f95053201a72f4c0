"""Activation calibration: a per-tensor step from observed activations.

The deploy model's ``ActQuant`` layers record, per calibration batch, the
largest ``|x|`` and a fixed sample of values (``layers/act_quant.py``).
:func:`calibrated_step` turns what was recorded over all batches into a step:

* ``minmax``: ``max|x| / qmax``, nothing clipped (the naive baseline);
* ``percentile``: the ``percentile``-th percentile of ``|x|`` over the sample
  is the top level (outliers beyond it are clipped);
* ``mse``: the clip with the least squared quantization error on the sample
  (:func:`repvgg_jax.quant.uniform.mse_step`).
"""

from __future__ import annotations

import numpy as np

from repvgg_jax.quant import uniform

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

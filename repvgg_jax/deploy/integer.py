"""Integer inference of a packed model: int8 activations x int8 weights -> int32
convolutions, then a float requantization (every weight codebook on a per-channel
int8 grid)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.deploy.runtime import model_from, normalize_images
from repvgg_jax.models.repvgg import SIGNED_INPUT_LAYER
from repvgg_jax.quant import uniform
from repvgg_jax.quant.packed import PackedModel


def int8_weights(packed: PackedModel, path: str) -> tuple[np.ndarray, np.ndarray]:
  """(int8 kernel, float32 per-channel scale) of a layer whose levels are ``scale x int8``."""
  l = packed.layers.get(path)
  if l is None or "int_scale" not in l:
    raise ValueError(f"integer inference: layer {path} has no int8 grid (quantize it with "
                     "quant.int8_levels=True, or a uniform or lsq quantizer, at <= 8 bits)")
  w = np.asarray(packed.kernel(path), np.float64)
  scale = np.broadcast_to(np.asarray(packed.int_scale(path), np.float64), w.shape[-1:])
  k = np.rint(w / scale)
  if k.min() < -128 or k.max() > 127 or np.abs(k * scale - w).max() > 1e-5 * np.abs(w).max():
    raise ValueError(f"integer inference: the levels of {path} are not scale x int8")
  return k.astype(np.int8), scale.astype(np.float32)


def int32_bias(bias, act_step: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(int32 bias, its float32 scale ``act_step * w_scale[o]``): the bias on the grid of
  the conv's int32 accumulator, as int8 runtimes (ONNX Runtime, TensorRT, TFLite) add it."""
  scale = (np.float32(act_step) * np.asarray(w_scale, np.float32)).astype(np.float32)
  q = np.rint(np.asarray(bias, np.float64) / scale)
  if np.abs(q).max() >= 2 ** 31:
    raise ValueError(f"integer inference: a bias of {np.abs(bias).max():g} does not fit int32 "
                     f"at scale {scale.min():g} (activation step x weight scale)")
  return q.astype(np.int32), scale


def integer_forward_fn(packed: PackedModel):
  """``f(images uint8 NHWC) -> logits``: every conv and the head as int8 x int8
  -> int32 (``lax.conv_general_dilated`` / ``lax.dot_general`` with
  ``preferred_element_type=int32``) plus the int32 bias (:func:`int32_bias`),
  requantized in float32: ``acc * (act_step * weight_scale[o])``, then ReLU; the
  head's float bias is added to its dequantized output. Unsigned 8-bit
  activations are shifted by 128 into int8 and the shift is added back as
  ``128 * sum(w)`` per output channel (padding uses the shifted zero)."""
  desc = packed.model
  model = model_from(desc, "packed model")
  bits = desc["act_bits"]
  if not bits:
    raise ValueError("integer inference needs quantized activations (act_bits=0 in this model)")
  if desc["se"]:
    raise ValueError("integer inference: SE layers (D2se) are not supported")
  variables = packed.to_variables()
  p, quant = variables["params"], variables["quant"]
  layers = []
  for b in model.layers():
    k, scale = int8_weights(packed, f"{b.name}/reparam_conv/kernel")
    step = float(uniform.learned_step(quant[b.name]["act"]["step"]))
    layers.append((b, k, *int32_bias(p[b.name]["reparam_conv"]["bias"], step, scale), step))
  head_k, head_scale = int8_weights(packed, "head/kernel")
  head_step = float(uniform.learned_step(quant["head_act"]["step"]))

  def to_int8(x, step, signed):
    qmin, qmax = uniform.int_range(bits, signed)
    zp = 128 if qmax > 127 else 0
    return (uniform.int_values(x, step, qmin, qmax) - zp).astype(jnp.int8), zp

  def forward(images):
    x = normalize_images(images, desc["mean"], desc["std"])
    for b, k, bias, acc_scale, step in layers:
      xi, zp = to_int8(x, step, b.name == SIGNED_INPUT_LAYER)
      # The barrier keeps XLA from folding a zero pad into the int8 convolution: XLA CPU
      # (jaxlib 0.10) then sums garbage on maps of 2x2 and smaller (tests/test_deploy.py).
      xi = jax.lax.optimization_barrier(
          jnp.pad(xi, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-zp))
      acc = jax.lax.conv_general_dilated(
          xi, jnp.asarray(k), (b.strides, b.strides), "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=b.groups,
          preferred_element_type=jnp.int32)
      if zp:
        acc = acc + zp * jnp.asarray(k.astype(np.int32).sum(axis=(0, 1, 2)))
      x = jax.nn.relu((acc + jnp.asarray(bias)).astype(jnp.float32) * acc_scale)
    pooled = jnp.mean(x, axis=(1, 2))
    xi, zp = to_int8(pooled, head_step, False)
    acc = jax.lax.dot_general(xi, jnp.asarray(head_k), (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    if zp:
      acc = acc + zp * jnp.asarray(head_k.astype(np.int32).sum(axis=0))
    return acc.astype(jnp.float32) * (head_step * head_scale) + p["head"]["bias"]
  return forward

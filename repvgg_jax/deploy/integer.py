"""Integer inference of a packed model, one loop over its deploy graph: int8 activations x
int8 weights -> int32 convolutions and dense products, then a float requantization (every
weight codebook on a per-channel int8 grid)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.deploy.graph import Graph, Layer, deploy_graph
from repvgg_jax.deploy.runtime import normalize_images
from repvgg_jax.quant import uniform
from repvgg_jax.quant.packed import PackedModel


def int32_bias(bias, act_step: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(int32 bias, its float32 scale ``act_step * w_scale[o]``): the bias on the grid of
  the conv's int32 accumulator, as int8 runtimes (ONNX Runtime, TensorRT, TFLite) add it."""
  scale = (np.float32(act_step) * np.asarray(w_scale, np.float32)).astype(np.float32)
  q = np.rint(np.asarray(bias, np.float64) / scale)
  if np.abs(q).max() >= 2 ** 31:
    raise ValueError(f"integer inference: a bias of {np.abs(bias).max():g} does not fit int32 "
                     f"at scale {scale.min():g} (activation step x weight scale)")
  return q.astype(np.int32), scale


def input_integers(graph: Graph, step: float, signed: bool) -> np.ndarray:
  """``(3, 256)`` float32: the integers of the first quantization of the network's input,
  for each channel and uint8 pixel value: the normalization and the grid of ``step``,
  the very functions :func:`integer_forward_fn` applies to an image (a pixel's integer
  depends on its value and channel alone, so a runtime may look it up)."""
  qmin, qmax = uniform.int_range(graph.act_bits, signed)
  pixels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None, None], 3, axis=-1)
  x = normalize_images(pixels, graph.mean, graph.std)  # (1, 256, 1, 3)
  return np.asarray(uniform.int_values(x, step, qmin, qmax))[0, :, 0].T


def integer_forward_fn(packed: PackedModel | Graph):
  """``f(images uint8 NHWC) -> logits``: every layer as int8 x int8 -> int32
  (``lax.conv_general_dilated`` / ``lax.dot_general`` with
  ``preferred_element_type=int32``) plus the int32 bias (:func:`int32_bias`; the dense
  head's too, as ONNX Runtime's ``QGemm`` adds it: within half an accumulator step of the
  float bias), then ReLU on the integers where the layer has one. The accumulator is
  requantized straight to the next layer's input grid, as ONNX Runtime's ``QLinearConv``
  does: ``round(clip(acc * m[o]))`` with the float32 multiplier ``m[o] = (act_step *
  weight_scale[o]) / next_step`` (half to even). A pooled layer with a ``pool_step`` pools
  integers, as ``QLinearGlobalAveragePool``: the map requantized to ``pool_step``, summed
  over its ``n`` pixels in int32, times the float32 ``pool_step / (act_step * n)``,
  rounded and clipped to the layer's input grid. The last layer's accumulator times its
  scale are the logits. Unsigned 8-bit activations are shifted by 128 into int8 and the
  shift is added back as ``128 * sum(w)`` per output channel (padding uses the shifted
  zero)."""
  graph = packed if isinstance(packed, Graph) else deploy_graph(packed)
  bits = graph.act_bits
  if not bits:
    raise ValueError("integer inference needs quantized activations (act_bits=0 in this model)")
  plan = []
  for layer in graph.layers:
    if layer.se is not None:
      raise ValueError(f"integer inference: layer {layer.name} has an SE block (D2se), which "
                       "is not supported")
    k, scale = graph.int8_weights(layer)
    bias, acc_scale = int32_bias(layer.bias, layer.act_step, scale)
    plan.append((layer, k, bias, acc_scale))

  def grid(x, step, signed: bool):
    """The integers (float dtype) of ``x`` on the grid of ``step``: ``x`` the float
    input, or ``(int32 accumulator, its float32 scale)`` requantized by one multiply."""
    qmin, qmax = uniform.int_range(bits, signed)
    if not isinstance(x, tuple):
      return uniform.int_values(x, step, qmin, qmax)
    acc, scale = x
    m = (np.asarray(scale, np.float32) / np.float32(step)).astype(np.float32)
    return jnp.round(jnp.clip(acc.astype(jnp.float32) * m, qmin, qmax))

  def input_values(x, layer: Layer):
    """The integers (float dtype) of the layer's quantized input."""
    qmin, qmax = uniform.int_range(bits, layer.act_signed)
    if not layer.pool:
      return grid(x, layer.act_step, layer.act_signed)
    if layer.pool_step is None:  # the float map's mean
      x = x[0].astype(jnp.float32) * x[1] if isinstance(x, tuple) else x
      return grid(jnp.mean(x, axis=(1, 2)), layer.act_step, layer.act_signed)
    values = grid(x, layer.pool_step, False)
    n = values.shape[1] * values.shape[2]
    total = jnp.sum(values.astype(jnp.int32), axis=(1, 2))
    mult = np.float32(layer.pool_step) / (np.float32(layer.act_step) * np.float32(n))
    return jnp.round(jnp.clip(total.astype(jnp.float32) * mult, qmin, qmax))

  def to_int8(values, layer: Layer):
    """The layer's input integers as int8, and the shift."""
    zp = 128 if uniform.int_range(bits, layer.act_signed)[1] > 127 else 0
    return (values - zp).astype(jnp.int8), zp

  def forward(images):
    x = normalize_images(images, graph.mean, graph.std)
    for layer, k, bias, acc_scale in plan:
      xi, zp = to_int8(input_values(x, layer), layer)
      in_axes = (0, 1, 2) if layer.kind == "conv" else (0,)
      if layer.kind == "conv":
        p = layer.padding
        # The barrier keeps XLA from folding a zero pad into the int8 convolution: XLA CPU
        # (jaxlib 0.10) then sums garbage on maps of 2x2 and smaller (tests/deploy/test_deploy.py).
        xi = jax.lax.optimization_barrier(
            jnp.pad(xi, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-zp))
        acc = jax.lax.conv_general_dilated(
            xi, jnp.asarray(k), (layer.strides, layer.strides), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=layer.groups,
            preferred_element_type=jnp.int32)
      else:
        acc = jax.lax.dot_general(xi, jnp.asarray(k), (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
      if zp:
        acc = acc + zp * jnp.asarray(k.astype(np.int32).sum(axis=in_axes))
      acc = acc + jnp.asarray(bias)
      if layer.relu:
        acc = jnp.maximum(acc, 0)
      x = (acc, acc_scale)
    return x[0].astype(jnp.float32) * x[1]
  return forward

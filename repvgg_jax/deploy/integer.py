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


def integer_forward_fn(packed: PackedModel | Graph):
  """``f(images uint8 NHWC) -> logits``: every layer as int8 x int8 -> int32
  (``lax.conv_general_dilated`` / ``lax.dot_general`` with
  ``preferred_element_type=int32``) plus the int32 bias (:func:`int32_bias`),
  requantized in float32: ``acc * (act_step * weight_scale[o])``, then ReLU where the
  layer has one; a dense layer adds its float bias after the requantization. Unsigned 8-bit activations are shifted by 128 into int8 and the shift
  is added back as ``128 * sum(w)`` per output channel (padding uses the shifted zero)."""
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
    if layer.kind == "conv":
      bias, acc_scale = int32_bias(layer.bias, layer.act_step, scale)
    else:  # the dense head adds its float bias to the dequantized product
      bias, acc_scale = None, np.float32(layer.act_step) * scale
    plan.append((layer, k, bias, acc_scale))

  def to_int8(x, layer: Layer):
    qmin, qmax = uniform.int_range(bits, layer.act_signed)
    zp = 128 if qmax > 127 else 0
    return (uniform.int_values(x, layer.act_step, qmin, qmax) - zp).astype(jnp.int8), zp

  def forward(images):
    x = normalize_images(images, graph.mean, graph.std)
    for layer, k, bias, acc_scale in plan:
      if layer.pool:
        x = jnp.mean(x, axis=(1, 2))
      xi, zp = to_int8(x, layer)
      in_axes = (0, 1, 2) if layer.kind == "conv" else (0,)
      if layer.kind == "conv":
        p = layer.padding
        # The barrier keeps XLA from folding a zero pad into the int8 convolution: XLA CPU
        # (jaxlib 0.10) then sums garbage on maps of 2x2 and smaller (tests/test_deploy.py).
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
      if bias is None:
        x = acc.astype(jnp.float32) * acc_scale + layer.bias
      else:
        x = (acc + jnp.asarray(bias)).astype(jnp.float32) * acc_scale
      if layer.relu:
        x = jax.nn.relu(x)
    return x
  return forward

"""The packed model's float forward in JAX, one loop over its :class:`~repvgg_jax.deploy.graph.Graph`:
uint8 images -> normalized floats -> each layer's input fake-quant (a pooled layer's:
the map's fake-quant, the mean, the pooled vector's), conv or dense, bias, SE, ReLU ->
logits. The same arithmetic, op for op, as the merged flax model
(``RepVGG(deploy=True, conv_impl="xla")``) applied to the decoded variables, which every
other runtime of the packed file reproduces."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from repvgg_jax.data.transforms import normalize
from repvgg_jax.deploy.graph import Graph, Layer, deploy_graph
from repvgg_jax.models.conv import lax_conv_general_dilated
from repvgg_jax.quant import uniform
from repvgg_jax.quant.packed import PackedModel


def normalize_images(images: jax.Array, mean: Any, std: Any) -> jax.Array:
  """uint8 NHWC (C = 1 or 3) -> float32 NHWC with 3 channels: the input
  pipeline's normalization (:func:`repvgg_jax.data.transforms.normalize`)."""
  images = jnp.asarray(images)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return normalize(images, mean, std)


def _dense(x: jax.Array, kernel: jax.Array, bias: Any) -> jax.Array:
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y + jnp.reshape(jnp.asarray(bias), (1,) * (y.ndim - 1) + (-1,))


def _squeeze_excite(x: jax.Array, se: Any) -> jax.Array:
  s = jnp.mean(x, axis=(1, 2), keepdims=True)
  s = jax.nn.relu(_dense(s, jnp.asarray(se["down"]["kernel"]), se["down"]["bias"]))
  return x * jax.nn.sigmoid(_dense(s, jnp.asarray(se["up"]["kernel"]), se["up"]["bias"]))


def _fake_quant(x: jax.Array, step: Any, bits: int, signed: bool) -> jax.Array:
  qmin, qmax = uniform.int_range(bits, signed)
  return uniform.int_values(x, jnp.float32(step), qmin, qmax) * jnp.float32(step)


def layer_forward(graph: Graph, layer: Layer, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """One layer of the graph on a float input ``x`` with its decoded ``kernel``."""
  if layer.pool:
    if layer.pool_step is not None:
      x = _fake_quant(x, layer.pool_step, graph.act_bits, False)
    x = jnp.mean(x, axis=(1, 2))
  if layer.act_step is not None:
    x = _fake_quant(x, layer.act_step, graph.act_bits, layer.act_signed)
  if layer.kind == "conv":
    p = layer.padding
    y = lax_conv_general_dilated(x, kernel, (layer.strides, layer.strides), ((p, p), (p, p)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=layer.groups)
    y = y + jnp.asarray(layer.bias).reshape((1,) * (y.ndim - 1) + (-1,))
    if layer.se is not None:
      y = _squeeze_excite(y, layer.se)
  else:
    y = _dense(x, kernel, layer.bias)
  return jax.nn.relu(y) if layer.relu else y


def graph_forward(graph: Graph) -> Callable[[dict[str, jax.Array], jax.Array], jax.Array]:
  """``f(kernels, images uint8 NHWC) -> logits float32``: ``kernels`` maps each layer's
  kernel path to its decoded kernel (:func:`decoded_kernels`); the small leaves (biases,
  steps, SE) are constants of the program."""
  def forward(kernels, images):
    x = normalize_images(images, graph.mean, graph.std)
    for layer in graph.layers:
      x = layer_forward(graph, layer, x, kernels[layer.kernel])
    return x.astype(jnp.float32)
  return forward


def decoded_kernels(graph: Graph, xp: Any = jnp) -> dict[str, Any]:
  """Every layer's decoded float32 kernel by its path (``xp=jax.numpy`` inside a program)."""
  return {layer.kernel: graph.kernel(layer, xp) for layer in graph.layers}


def forward_fn(packed: PackedModel | Graph) -> Callable[[jax.Array], jax.Array]:
  """``f(images uint8 NHWC) -> logits float32``: decode, normalize, forward. Traced, the
  packed bytes stay constants of the program and are decoded inside it (on every call,
  unless the compiler folds the decode: :class:`~repvgg_jax.deploy.model.DeployedModel`
  decodes once)."""
  graph = packed if isinstance(packed, Graph) else deploy_graph(packed)
  forward = graph_forward(graph)
  return lambda images: forward(decoded_kernels(graph), images)

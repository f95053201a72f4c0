"""A packed file loaded and ready to run: :func:`load_packed` -> :class:`DeployedModel`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.deploy.graph import Graph, deploy_graph
from repvgg_jax.deploy.integer import integer_forward_fn
from repvgg_jax.deploy.runtime import decoded_kernels, graph_forward
from repvgg_jax.quant.packed import PackedModel, read_packed


@dataclasses.dataclass
class DeployedModel:
  """A packed model ready to run: ``model(images)`` on uint8 NHWC images of
  ``image_size`` (1 or 3 channels) returns float32 logits ``(N, num_classes)``."""
  packed: PackedModel
  graph: Graph | None = None  # the packed model's deploy graph (built when not given)

  def __post_init__(self):
    if self.graph is None:
      self.graph = deploy_graph(self.packed)  # validates the description
    # Decoded once (on the first call), not in every call as export_stablehlo's program does.
    self._forward = jax.jit(graph_forward(self.graph))
    self._kernels = None
    self._integer = None

  @property
  def model(self) -> dict[str, Any]:
    return self.packed.model

  def _check(self, images) -> jax.Array:
    images = jnp.asarray(images)
    size = self.graph.image_size
    if (images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[1:3] != (size, size)
        or images.shape[3] not in (1, 3)):
      raise ValueError(f"expected uint8 images of shape (N, {size}, {size}, 1 or 3), got "
                       f"{images.dtype} {tuple(images.shape)}")
    return images

  def __call__(self, images) -> jax.Array:
    """Logits of the fake-quant deploy forward (float arithmetic on the quantized values)."""
    images = self._check(images)
    if self._kernels is None:
      self._kernels = jax.device_put(decoded_kernels(self.graph, np))
    return self._forward(self._kernels, images)

  def integer(self, images) -> jax.Array:
    """Logits of the integer forward (:func:`integer_forward_fn`)."""
    if self._integer is None:
      self._integer = jax.jit(integer_forward_fn(self.graph))
    return self._integer(self._check(images))

  def to_variables(self) -> dict[str, Any]:
    return self.packed.to_variables()

  def size_bytes(self) -> int:
    return self.packed.size_bytes()

  def save(self, path) -> None:
    self.packed.save(path)


def load_packed(path) -> DeployedModel:
  """Reads a packed file (validated: format, version, sizes, the model it describes) into
  a callable model."""
  packed = read_packed(path)
  return DeployedModel(packed, deploy_graph(packed, f"load_packed: {os.fspath(path)}"))

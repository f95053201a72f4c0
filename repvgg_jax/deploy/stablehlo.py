"""StableHLO export: the packed model's forward serialized by ``jax.export``. The packed
low-bit bytes are constants of the program and are decoded inside it, so the file is
about the packed file's size; ``jax.export.deserialize(...).call(images)`` runs it
where repvgg_jax is not installed (jax and flatbuffers are needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from repvgg_jax.deploy.runtime import forward_fn
from repvgg_jax.fileio import atomic_write_bytes
from repvgg_jax.quant.export import PackedModel


def export_stablehlo(packed: PackedModel, path=None) -> bytes:
  """The quantized deploy forward (uint8 images -> logits, any batch size)
  serialized by ``jax.export``; written atomically to ``path`` when given."""
  size = packed.model["image_size"]
  batch, = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  data = jax.export.export(jax.jit(forward_fn(packed)))(spec).serialize()
  if path is not None:
    atomic_write_bytes(path, data)
  return data

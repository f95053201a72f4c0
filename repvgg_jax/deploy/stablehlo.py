"""StableHLO export: the packed model's forward serialized by ``jax.export``. The packed
low-bit bytes are constants of the program and are decoded inside it, so the file is
about the packed file's size; ``jax.export.deserialize(...).call(images)`` runs it
where repvgg_jax is not installed (jax and flatbuffers are needed).

Other compilers read ``jax.export.deserialize(data).mlir_module()``. IREE (3.13,
``--iree-input-type=stablehlo``) compiles the static-batch form (``batch_size=N``)
unchanged. It rejects the symbolic batch: jax.export reads the batch from the uint8
argument (``stablehlo.get_dimension_size`` in ``@main``), IREE lowers that to a
``tensor.dim`` of a ``tensor<?x...xui8>`` and cannot convert an unsigned tensor there
(``failed to legalize operation 'tensor.dim' that was explicitly marked illegal``);
the same program with float32 or int8 images compiles."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from repvgg_jax.deploy.graph import Graph, deploy_graph
from repvgg_jax.deploy.runtime import forward_fn
from repvgg_jax.fileio import atomic_write_bytes
from repvgg_jax.quant.packed import PackedModel


def _batch_dim(batch_size):
  if batch_size is None:
    return jax.export.symbolic_shape("batch")[0]
  if (not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool)
      or batch_size < 1):
    raise ValueError(f"export_stablehlo: batch_size={batch_size!r} is not a positive int "
                     "(None: any batch size)")
  return int(batch_size)


def export_stablehlo(packed: PackedModel | Graph, path=None, *,
                     batch_size: int | None = None) -> bytes:
  """The quantized deploy forward (uint8 images -> logits) of a packed model (or its deploy
  graph) serialized by ``jax.export``; written atomically to ``path`` when given. ``batch_size=None``: any batch size (a
  symbolic dimension; runs with ``jax.export``, not IREE); an int: that batch only
  (static shapes, which IREE compiles)."""
  graph = packed if isinstance(packed, Graph) else deploy_graph(packed)
  size = graph.image_size
  spec = jax.ShapeDtypeStruct((_batch_dim(batch_size), size, size, 3), jnp.uint8)
  data = jax.export.export(jax.jit(forward_fn(graph)))(spec).serialize()
  if path is not None:
    atomic_write_bytes(path, data)
  return data

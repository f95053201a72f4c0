"""The one place that knows about devices: a 1-D ``data`` mesh, batch sharded, state replicated."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices: Any = None) -> Mesh:
  """A ``Mesh(("data",))`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a host pytree (the same on every process) on every device of the mesh."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
      lambda x: multihost_utils.host_local_array_to_global_array(np.asarray(x), mesh, P()), tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local batch (B_local, ...) -> global array (B_global, ...) sharded on ``data``.

  With one process this is a ``device_put``; with several, each process
  contributes its rows (``host_local_array_to_global_array``).
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_sharding(mesh))
  return multihost_utils.host_local_array_to_global_array(batch, mesh, P("data"))


def to_host(tree: Any) -> Any:
  """Replicated global arrays -> numpy on this process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(get, tree)

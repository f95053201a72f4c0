"""The one place that knows about devices: processes joined, a 1-D ``data`` mesh, batch sharded,
state replicated."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(cfg: Any) -> None:
  """``jax.distributed.initialize`` when ``cfg.distributed.initialize`` (before any jax use),
  then one log line of the processes and devices.

  Empty/unset fields are left to JAX's auto-detection (TPU VMs, SLURM).
  """
  d = cfg.distributed
  if d.initialize:
    kwargs = {}
    if d.coordinator_address:
      kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes:
      kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
      kwargs["process_id"] = d.process_id
    # CPU collectives across processes need gloo; the flag does not affect TPU/GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
  logging.info("JAX: %d process(es), %d device(s): %s", jax.process_count(), jax.device_count(),
               jax.devices()[:4])


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


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast_from_primary(tree: Any) -> Any:
  """Process 0's ``tree`` (numpy leaves) on every process; others pass anything (ignored).

  For values computed on the host of process 0 only (the NumPy codebook fit):
  the tree travels as msgpack bytes, so the other processes need not know its
  structure. One process: ``tree`` unchanged.
  """
  if jax.process_count() == 1:
    return tree
  import flax
  primary = jax.process_index() == 0
  payload = np.frombuffer(flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, tree)), np.uint8) if primary else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
  buf = payload if primary else np.zeros(size, np.uint8)
  buf = multihost_utils.broadcast_one_to_all(buf)
  return flax.serialization.msgpack_restore(np.asarray(buf, np.uint8).tobytes())


def to_host(tree: Any) -> Any:
  """Replicated global arrays -> numpy on this process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(get, tree)

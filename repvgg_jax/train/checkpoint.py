"""One orbax ``CheckpointManager`` per stage: the train state, the data iterator position, metadata.

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed during a save leaves the previous step as the latest
readable one; ``latest_step`` never names a partial save. Saves are collective:
every process calls ``save`` at the same step (the loop decides when, from
values all processes share).

A state is restored into the shardings of the state it is given (its arrays'
``.sharding``), so a run saved on 8 devices resumes on 1 or 4.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


def _registry() -> Any:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler())
  registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
  for name in ("data", "meta"):
    registry.add(name, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add(name, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
  return registry


def _abstract(x: Any) -> Any:
  """The restore target of one leaf: shape, dtype and sharding of a placed array."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


class StageCheckpoints:
  """Async saves every ``every`` steps (the caller asks ``due``), keep the latest ``keep``."""

  def __init__(self, directory: str, *, every: int, keep: int):
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory, self.every = directory, every
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True, create=True),
        handler_registry=_registry())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether ``step`` is a periodic save step."""
    return step % self.every == 0

  def save(self, step: int, state: Any, data_state: Any, meta: dict | None = None) -> None:
    """Starts an async save of ``step`` (all processes call it at the same step)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta or {}))
    self.manager.save(step, args=args, force=True)

  def _has_item(self, step: int, name: str) -> bool:
    from etils import epath
    return (epath.Path(self.directory) / str(step) / name).exists()

  def restore(self, state: Any, step: int | None = None) -> tuple[Any, Any, dict]:
    """(state, data iterator state, meta) at ``step`` (default: the latest).

    ``state`` gives the structure and, for its ``jax.Array`` leaves, the target
    shardings; numpy leaves are restored as numpy.
    """
    step = self.latest_step() if step is None else step
    target = jax.tree_util.tree_map(_abstract, flax.serialization.to_state_dict(state))
    has_meta = self._has_item(step, "meta")  # Absent in checkpoints of older versions.
    args = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
    if has_meta:
      args["meta"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    meta = out["meta"] if has_meta else {}
    return flax.serialization.from_state_dict(state, out["state"]), out["data"], meta or {}

  def restore_host(self, step: int | None = None) -> dict:
    """The saved state dict at ``step`` (default: the latest) as numpy, in its saved structure."""
    step = self.latest_step() if step is None else step
    tree = self.manager.item_metadata(step)["state"].tree
    target = jax.tree_util.tree_map(lambda m: np.empty(m.shape, m.dtype), tree)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""One orbax ``CheckpointManager`` per stage: the train state plus the data iterator position.

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed during a save leaves the previous step as the latest
readable one; ``latest_step`` never names a partial save.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import orbax.checkpoint as ocp


class StageCheckpoints:
  """Periodic async saves, keep-N, forced saves (last step, SIGTERM), restore latest."""

  def __init__(self, directory: str, *, every: int, keep: int):
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                             enable_async_checkpointing=True, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether a save started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, state: Any, step: int | None = None) -> tuple[Any, Any]:
    """(state restored into the structure of ``state``, data iterator state) at ``step``/latest."""
    step = self.latest_step() if step is None else step
    target = flax.serialization.to_state_dict(state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return flax.serialization.from_state_dict(state, out["state"]), out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""One orbax ``CheckpointManager`` per stage: the train state, the data iterator position, metadata.

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed during a save leaves the previous step as the latest
readable one; ``latest_step`` never names a partial save. Saves are collective:
every process calls ``save`` at the same step (the loop decides when, from
values all processes share). A step that is complete but unreadable (a
truncated or damaged file) is moved aside to ``<directory>.unreadable/<step>``
with a warning, and the previous step is restored instead; nothing is deleted.

A state is restored into the shardings of the state it is given (its arrays'
``.sharding``), so a run saved on 8 devices resumes on 1 or 4.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from repvgg_jax.models.oabn import SETTINGS
from repvgg_jax.models.settings import check_settings


def _registry() -> Any:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler())
  registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
  for name in ("data", "meta"):
    registry.add(name, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add(name, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
  return registry


def _keys(tree: Any) -> set[str]:
  """The ``a/b/c`` paths of a state dict's leaves (or of orbax's metadata tree)."""
  return {"/".join(map(str, k)) for k in flax.traverse_util.flatten_dict(
      tree, is_leaf=lambda _, v: not isinstance(v, dict))}


def key_diff(want: Any, have: Any) -> list[str]:
  """``["missing k", ..., "unexpected k", ...]``: the keys of ``want`` not in ``have``, then
  those of ``have`` not in ``want``, each sorted."""
  return ([f"missing {k}" for k in sorted(set(want) - set(have))]
          + [f"unexpected {k}" for k in sorted(set(have) - set(want))])


def _abstract(x: Any) -> Any:
  """The restore target of one leaf: shape, dtype and sharding of a placed array."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


class StageCheckpoints:
  """Async saves of the steps the caller picks; keeps the latest ``keep``."""

  def __init__(self, directory: str, *, keep: int, create: bool = True):
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True, create=create),
        handler_registry=_registry())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any, meta: dict | None = None) -> None:
    """Starts an async save of ``step`` (all processes call it at the same step)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta or {}))
    self.manager.save(step, args=args, force=True)

  def restore(self, state: Any, step: int | None = None) -> tuple[Any, Any, dict]:
    """(state, data iterator state, meta) at ``step`` (default: the latest readable one).

    ``state`` gives the structure and, for its ``jax.Array`` leaves, the target
    shardings; numpy leaves are restored as numpy.
    """
    target = jax.tree_util.tree_map(_abstract, flax.serialization.to_state_dict(state))

    def args(step: int) -> Any:
      return ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())

    try:
      step, out = self._restore_readable(step, args)
    except ValueError as e:
      mismatch = self._tree_mismatch(target)
      if mismatch:
        raise ValueError(mismatch) from e
      raise
    return (flax.serialization.from_state_dict(state, out["state"]), out["data"],
            out["meta"] or {})

  def _saved_tree(self) -> dict | None:
    """The metadata tree of the latest checkpoint's state, or None when unreadable."""
    try:
      return self.manager.item_metadata(self.latest_step())["state"].tree
    except Exception:  # damaged metadata, or none: the restore error says more
      return None

  def _saved_keys(self) -> set[str] | None:
    """The leaf paths of the latest checkpoint's state, or None when unreadable."""
    tree = self._saved_tree()
    return None if tree is None else _keys(tree)

  def _tree_mismatch(self, target: Any) -> str | None:
    """A short message naming the keys by which the latest checkpoint's state differs
    from ``target`` (another model's checkpoint), or None when they agree or the
    checkpoint's metadata cannot be read."""
    have, want = self._saved_keys(), _keys(target)
    if have is None or have == want:
      return None
    diff = key_diff(want, have)
    named = [d for d in diff if d.startswith("missing")][:2] + \
        [d for d in diff if d.startswith("unexpected")][:2]
    n = len(diff)
    more = f" (and {n - len(named)} more)" if n > len(named) else ""
    return (f"the checkpoints in {self.directory} are of another model than the configured "
            f"one ({n} keys differ: {'; '.join(named)}{more}); pass a new "
            f"--workdir, or move {self.directory} aside")

  def restore_host(self, step: int | None = None) -> dict:
    """The saved state dict at ``step`` (default: the latest) as numpy, in its saved structure."""
    step = self.latest_step() if step is None else step
    tree = self.manager.item_metadata(step)["state"].tree
    target = jax.tree_util.tree_map(lambda m: np.empty(m.shape, m.dtype), tree)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return out["state"]

  def _restore_readable(self, step: int | None, args: Any) -> tuple[int, Any]:
    """``(step, restored)``: ``step``, or the latest readable step when ``step`` is None;
    ``args(step)`` gives the restore arguments.

    When the latest step fails and an older one restores, each failed step is
    moved to ``<directory>.unreadable/<step>`` (kept for inspection, out of
    orbax's sight) with a warning naming it. When no step restores (e.g. a tree
    of another model), nothing is moved and the latest step's error is raised.
    """
    if step is not None:
      return step, self.manager.restore(step, args=args(step))
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(step, args=args(step))
      except (ValueError, OSError) as e:  # tensorstore reports damaged files as ValueError
        failed.append((step, e))
        continue
      for bad, e in failed:
        path = os.path.join(self.directory, str(bad))
        aside = os.path.join(self.directory + ".unreadable", str(bad))
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(path, aside)
        logging.warning("checkpoint %s is unreadable (%s: %s); moved it to %s and resumed "
                        "from step %d", path, type(e).__name__, str(e)[:300], aside, step)
      if failed:
        self.manager.reload()
      return step, out
    if failed:
      raise failed[0][1]
    raise FileNotFoundError(f"no checkpoint in {self.directory}")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_variables(path: str, template: dict) -> dict:
  """Train-form variables from an FP-stage orbax directory, a .npz or a .msgpack file.

  ``template`` (freshly initialised variables of the configured model) gives the
  structure: missing, unexpected or mis-shaped entries raise one ValueError naming
  them all. A .npz holds flattened ``"params/stem/conv_kxk/conv/kernel"``-style
  keys; a .msgpack is ``flax.serialization.to_bytes(variables)``.
  """
  from flax import traverse_util
  if path.endswith((".msgpack", ".npz")) and not os.path.isfile(path):
    raise FileNotFoundError(f"init_from={path!r}: no such file")
  if path.endswith(".msgpack"):
    with open(path, "rb") as f:
      loaded = flax.serialization.msgpack_restore(f.read())
  elif path.endswith(".npz"):
    with np.load(path) as z:
      loaded = traverse_util.unflatten_dict({tuple(k.split("/")): z[k] for k in z.files})
  else:
    if not os.path.isdir(path):  # Never create it: a typo must not become a directory.
      raise FileNotFoundError(f"init_from={path!r} is not a directory (an FP-stage "
                              f"checkpoint directory) nor a .npz or .msgpack file")
    ckpt = StageCheckpoints(path, keep=1, create=False)
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"init_from={path!r}: no checkpoint in this directory")
    state_dict = ckpt.restore_host()
    ckpt.close()
    loaded = {k: state_dict[k] for k in ("params", "batch_stats", SETTINGS) if k in state_dict}
  want = traverse_util.flatten_dict(template, sep="/")
  got = traverse_util.flatten_dict(loaded, sep="/")
  problems = key_diff(want, got)
  problems += [f"{k}: shape {np.shape(got[k])}, model wants {np.shape(want[k])}"
               for k in sorted(set(want) & set(got)) if np.shape(got[k]) != np.shape(want[k])]
  if problems:
    raise ValueError(f"init_from={path!r} does not match the configured model (model.name, "
                     f"model.norm, model.block, model.oabn_form, number of classes): "
                     + "; ".join(problems))
  return traverse_util.unflatten_dict(
      {tuple(k.split("/")): np.asarray(v) for k, v in got.items()})


def import_variables(init_from: str, model: Any, template: dict) -> dict:
  """The train-form variables an FP stage that does not train starts from: those of
  ``init_from`` (:func:`load_variables`, their OABN settings checked against ``model``), or
  without it the random initialisation ``template``."""
  if not init_from:
    logging.warning("fp.enabled=False and no init_from: using the random initialisation")
    return template
  variables = load_variables(init_from, template)
  try:
    check_settings(model, variables)
  except ValueError as e:
    raise ValueError(f"init_from={init_from!r}: {e}") from None
  return variables

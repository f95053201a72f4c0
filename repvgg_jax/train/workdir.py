"""Which config each stage's checkpoints belong to, so a workdir never mixes two runs.

Beside each stage's orbax directory ``<workdir>/checkpoints/<stage>`` lies
``<stage>.json``: the config fields that determine the stage (its fingerprint)
and the seconds the stage took, summed over invocations. Before anything is
restored, a rerun compares the fingerprints with the config: a stage whose
fields changed is stale, and so is every later stage (QAT fine-tunes the FP
result). A stale stage is refused with one paragraph naming the changed fields,
unless the caller asked to discard stale stages; they are then moved aside to
``<workdir>/stale/<UTC time>/``, never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any, Iterator

from absl import logging

from repvgg_jax.fileio import atomic_write_text
from repvgg_jax.train.config import base_config

STAGES = ("fp", "qat")
# Fields that change how often a stage saves, not what it computes.
_NOT_DETERMINING = ("checkpoint_every", "keep", "profile_steps")
# How the convs are computed, not what: the same parameters, outputs equal up to float
# rounding (a run may switch, e.g. to resume a CPU run on a GPU).
_NOT_DETERMINING_MODEL = ("model.conv_impl",)
MAX_FIELDS_NAMED = 6


@contextlib.contextmanager
def open_run(workdir: str, cfg: Any, stages: tuple[str, ...], *, discard_stale: bool = False,
             write: bool = True) -> Iterator["Stages"]:
  """The :class:`Stages` of a run in ``workdir`` (created by process 0, ``write``), closed
  when the run ends or fails. A run that stops before writing anything (a bad data_dir,
  say) leaves no empty workdir behind it."""
  if "://" in workdir:
    raise ValueError(f"workdir={workdir!r}: only local directories (or a mounted bucket) "
                     "are supported for the workdir")
  new = not os.path.exists(workdir)
  try:
    # Before anything is restored: orbax must never see another config's tree.
    records = Stages(workdir, cfg, stages, discard_stale=discard_stale, write=write)
    try:
      if write:
        os.makedirs(workdir, exist_ok=True)
      yield records
    finally:
      records.close()
  except BaseException:
    if write and new and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)
    raise


def checkpoint_dir(workdir: str, stage: str = "") -> str:
  """``<workdir>/checkpoints/<stage>``, where a stage's checkpoints are (no ``stage``: the
  folder of every stage's and its ``<stage>.json`` record)."""
  return os.path.join(workdir, "checkpoints", stage) if stage else os.path.join(
      workdir, "checkpoints")


class StaleWorkdir(RuntimeError):
  """The workdir holds checkpoints of a stage trained with another config."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def fingerprint(cfg: Any, stage: str) -> dict[str, Any]:
  """The flat ``{"model.name": ..., ...}`` fields that determine ``stage``'s checkpoints.

  FP: seed, model, data, fp. QAT: also quant, qat and init_from (and fp only
  when QAT starts from this run's FP stage).
  """
  c = json.loads(cfg.to_json_best_effort())
  groups = ["seed", "model", "data"]
  if stage == "fp" or not c["init_from"]:
    groups.append("fp")
  if stage == "qat":
    groups += ["quant", "qat", "init_from"]
  flat = _flat({g: c[g] for g in groups})
  return {k: v for k, v in flat.items()
          if not (k.split(".")[0] in STAGES and k.split(".")[-1] in _NOT_DETERMINING)
          and k not in _NOT_DETERMINING_MODEL}


def _unused(flat: dict) -> set[str]:
  """The fields of a fingerprint that its other fields make irrelevant: the OABN
  settings of a model with plain BN."""
  if flat.get("model.norm") != "bn":
    return set()
  return {k for k in flat if k.startswith("model.oabn_")}


def _changes(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
  """The fields that differ; a field absent from ``old`` (a record written before
  the field existed) is unchanged when ``new`` has its default (``defaults``), and
  a field irrelevant to both (``_unused``) is unchanged."""
  missing = "(absent)"
  defaults = defaults or {}
  keys = (set(old) | set(new)) - (_unused(old) & _unused(new))
  return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
          for k in sorted(keys)
          if old.get(k, missing) != new.get(k, missing)
          and not (k not in old and k in defaults and new.get(k) == defaults[k])]


class Stages:
  """The stage records of one workdir for one config; checks them when created.

  Args:
    workdir: the run's directory; checkpoints are under ``<workdir>/checkpoints``.
    cfg: the run's config.
    stages: the stages this run trains, in order (a subset of ``STAGES``).
    discard_stale: move stale stages aside instead of refusing.
    write: whether this process writes (process 0).
  Raises:
    StaleWorkdir: a stage in ``stages`` has checkpoints of another config.
  """

  def __init__(self, workdir: str, cfg: Any, stages: tuple[str, ...], *,
               discard_stale: bool = False, write: bool = True):
    self.workdir, self.write = workdir, write
    self.root = checkpoint_dir(workdir)
    self.fingerprints = {s: fingerprint(cfg, s) for s in STAGES}
    self._defaults = {s: fingerprint(base_config(), s) for s in STAGES}
    self._running: dict[str, tuple[float, float]] = {}
    stale = self._stale(stages)
    if stale and not discard_stale:
      raise StaleWorkdir(self._refusal(stale))
    if stale and write:
      self._move_aside([s for s, _ in stale])

  def ckpt_dir(self, stage: str) -> str:
    return checkpoint_dir(self.workdir, stage)

  def _record_path(self, stage: str) -> str:
    return os.path.join(self.root, f"{stage}.json")

  def _read(self, stage: str) -> dict | None:
    try:
      with open(self._record_path(stage)) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:  # A record is written atomically; this is damage.
      logging.warning("%s: unreadable (%s); treated as a record of another config",
                      self._record_path(stage), e)
      return {"config": {}}

  def _stale(self, stages: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """[(stage, changed fields)] of stages with checkpoints of another config, in order."""
    stale, earlier_changed = [], None
    for stage in stages:
      if not os.path.isdir(self.ckpt_dir(stage)):
        continue
      record = self._read(stage)
      # A stage records its config before its first checkpoint: checkpoints without a
      # record are of no config this run can vouch for.
      changed = ([f"no {stage}.json record of its config"] if record is None else
                 _changes(record["config"], self.fingerprints[stage], self._defaults[stage]))
      if changed or earlier_changed:
        stale.append((stage, changed))
      earlier_changed = earlier_changed or changed
    return stale

  def _refusal(self, stale: list[tuple[str, list[str]]]) -> str:
    parts = []
    for stage, changed in stale:
      if parts:  # An earlier stage changed: this one was trained from the old result.
        parts.append(f"{stage} (trained from that {stale[0][0]} stage)")
        continue
      named = changed[:MAX_FIELDS_NAMED]
      if len(changed) > MAX_FIELDS_NAMED:
        named.append(f"and {len(changed) - MAX_FIELDS_NAMED} more")
      parts.append(f"{stage} ({'; '.join(named)})")
    return (f"workdir {self.workdir} holds checkpoints of another config: "
            f"{', '.join(parts)}. Nothing was changed. Either pass a new --workdir, or rerun "
            f"with --discard_stale (train_and_evaluate(..., discard_stale=True)) to move the stale "
            f"stages to {os.path.join(self.workdir, 'stale')}/ and train them again.")

  def _move_aside(self, stages: list[str]) -> None:
    dest = os.path.join(self.workdir, "stale", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(dest, exist_ok=True)
    for stage in stages:
      for path in (self.ckpt_dir(stage), self._record_path(stage)):
        if os.path.exists(path):
          shutil.move(path, os.path.join(dest, os.path.basename(path)))
      logging.warning("%s: stale checkpoints moved to %s", stage, dest)

  def _save(self, stage: str, seconds: float) -> None:
    if self.write:
      os.makedirs(self.root, exist_ok=True)
      atomic_write_text(self._record_path(stage), json.dumps(
          {"config": self.fingerprints[stage], "seconds": seconds}, indent=1))

  def start(self, stage: str) -> None:
    """Records the stage's fingerprint (before its first checkpoint) and starts its clock."""
    record = self._read(stage) or {}
    same = record.get("config") == self.fingerprints[stage]
    self._running[stage] = (record.get("seconds", 0.0) if same else 0.0, time.time())
    self._save(stage, self._running[stage][0])

  def stop(self, stage: str) -> float:
    """Stops the stage's clock; returns its seconds summed over invocations."""
    before, t = self._running.pop(stage)
    seconds = before + time.time() - t
    self._save(stage, seconds)
    return seconds

  def close(self) -> None:
    """Adds the time of a stage that stopped on an error or SIGTERM (a SIGKILL loses it)."""
    for stage in list(self._running):
      self.stop(stage)

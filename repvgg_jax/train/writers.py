"""Metric writer: console log, ``metrics.jsonl`` and TensorBoard, on process 0 only.

TensorBoard events go through ``tensorboardX`` (a core dependency; no TensorFlow,
so training never imports it even where the ``[prepare]`` extra installed it), one
run a stage: ``<workdir>/tensorboard/<stage>/``. ``metrics.jsonl`` (one JSON object
per logged step) is always written, for notebooks: ``pandas.read_json(path,
lines=True)``. A stage resumed from its checkpoint at step N logs the steps after N
again: it first drops its ``metrics.jsonl`` rows after N, and its TensorBoard writer
opens with ``purge_step=N + 1``, which tells TensorBoard to discard the stage's
events from N + 1 on that an earlier file holds. One directory a stage, because a
purge applies to the whole run it is written in (FP and QAT both count from step 1).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
from absl import logging

from repvgg_jax.fileio import atomic_write_text


class MetricWriter:
  """Scalars to the log, ``<workdir>/metrics.jsonl`` and TensorBoard.

  Call :meth:`start_stage` before a stage's scalars (keys ``"<stage>/..."``).
  ``enabled=False`` (processes other than 0) writes nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._stage, self._purge_step = None, None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    if self._tb is None:
      import tensorboardX
      logdir = tensorboard_dir(self.workdir, self._stage or "run")
      # tensorboardX names the file by the second it opens it: the count of the files
      # before keeps a stage restarted within that second from overwriting one.
      self._tb = tensorboardX.SummaryWriter(
          logdir, purge_step=self._purge_step,
          filename_suffix=f".{len(event_files(logdir))}")
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))

  def start_stage(self, stage: str, step: int) -> None:
    """``stage`` starts at ``step`` (0, or the step of the checkpoint it resumed
    from): drops its ``metrics.jsonl`` rows after ``step`` (keys ``"<stage>/..."``;
    other stages' rows are kept), and its TensorBoard events after ``step`` are
    purged (``purge_step``) once it writes again."""
    if not self.enabled:
      return
    self.close()
    self._stage, self._purge_step = stage, step + 1
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.read().splitlines()

    def drop(line: str) -> bool:
      try:
        row = json.loads(line)
      except ValueError:  # A line cut by a kill: drop it.
        return True
      return row.get("step", 0) > step and any(k.startswith(f"{stage}/") for k in row)
    kept = [line for line in lines if line and not drop(line)]
    if len(kept) != len(lines):
      atomic_write_text(self.path, "".join(line + "\n" for line in kept))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def tensorboard_dir(workdir: str, stage: str) -> str:
  """The TensorBoard run of ``stage``: ``tensorboard --logdir <workdir>/tensorboard``."""
  return os.path.join(workdir, "tensorboard", stage)


def event_files(logdir: str) -> list[str]:
  """The TensorBoard event files directly in ``logdir``, oldest first (none yet: [])."""
  if not os.path.isdir(logdir):
    return []
  names = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
  return [os.path.join(logdir, n) for n in sorted(names)]


def create_writer(workdir: str) -> MetricWriter:
  """The pipeline's writer: enabled on process 0 only."""
  return MetricWriter(workdir, enabled=jax.process_index() == 0)

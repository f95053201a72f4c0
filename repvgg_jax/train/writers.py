"""Metric writer: console log, ``metrics.jsonl`` and TensorBoard, on process 0 only.

TensorBoard events go through ``tensorboardX`` (a core dependency; no TensorFlow,
so training never imports it even where the ``[prepare]`` extra installed it).
``metrics.jsonl`` (one JSON object per logged step) is always written, for
notebooks: ``pandas.read_json(path, lines=True)``. A resumed stage first drops the
rows it logged after its checkpoint, so no step appears twice.
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

  ``enabled=False`` (processes other than 0) writes nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      import tensorboardX
      self._tb = tensorboardX.SummaryWriter(workdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def discard_after(self, stage: str, step: int) -> None:
    """Drops the ``metrics.jsonl`` rows of ``stage`` (keys ``"<stage>/..."``) after ``step``.

    A stage resumed from its checkpoint at ``step`` logs the later steps again;
    without this they would appear twice. Other stages' rows are kept.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.read().splitlines()

    def later(line: str) -> bool:
      try:
        row = json.loads(line)
      except ValueError:  # A line cut by a kill: drop it.
        return True
      return row.get("step", 0) > step and any(k.startswith(f"{stage}/") for k in row)
    kept = [line for line in lines if line and not later(line)]
    if len(kept) != len(lines):
      atomic_write_text(self.path, "".join(line + "\n" for line in kept))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def create_writer(workdir: str) -> MetricWriter:
  """The pipeline's writer: enabled on process 0 only."""
  return MetricWriter(workdir, enabled=jax.process_index() == 0)

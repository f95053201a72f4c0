"""Metric writer: console log, ``metrics.jsonl`` and TensorBoard, on process 0 only.

TensorBoard events go through clu's ``metric_writers.SummaryWriter`` where clu's
writers import (they need TensorFlow), else through ``tensorboardX`` (a core
dependency, no TensorFlow needed). ``metrics.jsonl`` (one JSON object per
logged step) is always written, for notebooks: ``pandas.read_json(path, lines=True)``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
from absl import logging


def _tensorboard(workdir: str) -> Any:
  """A writer with ``write_scalars(step, scalars)``, ``flush``, ``close``; None if none imports."""
  try:
    from clu import metric_writers
    return metric_writers.SummaryWriter(workdir)
  except ImportError:
    pass
  try:
    import tensorboardX
  except ImportError:
    logging.warning("neither TensorFlow (for clu) nor tensorboardX: no TensorBoard events")
    return None

  class _TensorboardX:
    def __init__(self):
      self._w = tensorboardX.SummaryWriter(workdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
      for k, v in scalars.items():
        self._w.add_scalar(k, v, step)

    def flush(self) -> None:
      self._w.flush()

    def close(self) -> None:
      self._w.close()

  return _TensorboardX()


class MetricWriter:
  """Scalars to the log, ``<workdir>/metrics.jsonl`` and TensorBoard.

  ``enabled=False`` (processes other than 0) writes nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = _tensorboard(workdir) if enabled else None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), values)

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

"""Metric writers: clu's default writer (TensorBoard + console) when it imports, else console + JSONL.

``clu.metric_writers`` imports TensorFlow for its TensorBoard writer; where
TensorFlow is not installed the fallback logs the same scalars and appends them
to ``<workdir>/metrics.jsonl``. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
from absl import logging


class JsonlWriter:
  """Scalars to the log and one JSON object per line in ``metrics.jsonl``."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create_writer(workdir: str) -> Any:
  """clu ``create_default_writer`` if available, else :class:`JsonlWriter`."""
  primary = jax.process_index() == 0
  try:
    from clu import metric_writers
  except ImportError:
    return JsonlWriter(workdir, primary)
  return metric_writers.create_default_writer(workdir, just_logging=not primary)

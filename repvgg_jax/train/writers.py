"""Metric writer: console log, ``metrics.jsonl`` and TensorBoard, on process 0 only.

TensorBoard events go through ``tensorboardX`` (a core dependency; no TensorFlow,
so training never imports it even where the ``[prepare]`` extra installed it).
``metrics.jsonl`` (one JSON object per logged step) is always written, for
notebooks: ``pandas.read_json(path, lines=True)``. A resumed stage first drops the
rows and the TensorBoard events it logged after its checkpoint, so no step appears
twice in either. Event files are append-only records, so that rewrites each file
without them; tensorboardX writes records but has no reader, hence ``_records``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterator, Mapping

import jax
from absl import logging

from repvgg_jax.fileio import atomic_write, atomic_write_text


class MetricWriter:
  """Scalars to the log, ``<workdir>/metrics.jsonl`` and TensorBoard.

  ``enabled=False`` (processes other than 0) writes nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._suffix = ""  # ".<stage>" once a stage started: a new event file per stage start.

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    if self._tb is None:
      import tensorboardX
      # tensorboardX names the file by the second it opens it: the count of the files
      # before keeps a stage restarted within that second from overwriting one.
      self._tb = tensorboardX.SummaryWriter(
          self.workdir, filename_suffix=f"{self._suffix}.{len(event_files(self.workdir))}")
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))

  def discard_after(self, stage: str, step: int) -> None:
    """Drops the ``metrics.jsonl`` rows and TensorBoard events of ``stage`` (keys
    ``"<stage>/..."``) after ``step``; the stage's scalars then go to a new event file.

    A stage resumed from its checkpoint at ``step`` logs the later steps again;
    without this they would appear twice. Other stages' rows are kept.
    """
    if not self.enabled:
      return
    self.close()  # The open event file is rewritten below; the next write opens another.
    self._suffix = f".{stage}"

    def later(row_step: int, keys) -> bool:
      return row_step > step and any(k.startswith(f"{stage}/") for k in keys)

    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = f.read().splitlines()

      def drop(line: str) -> bool:
        try:
          row = json.loads(line)
        except ValueError:  # A line cut by a kill: drop it.
          return True
        return later(row.get("step", 0), row)
      kept = [line for line in lines if line and not drop(line)]
      if len(kept) != len(lines):
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
    for path in event_files(self.workdir):
      _filter_events(path, lambda e: not later(e.step, [v.tag for v in e.summary.value]))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def event_files(workdir: str) -> list[str]:
  """The TensorBoard event files directly in ``workdir``, oldest first."""
  if not os.path.isdir(workdir):
    return []
  names = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")]
  return [os.path.join(workdir, n) for n in sorted(names)]


def _records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file (length, its CRC, data, its CRC), up to a record
  cut short by a kill."""
  with open(path, "rb") as f:
    buf = f.read()
  i = 0
  while i + 12 <= len(buf):
    (n,) = struct.unpack("<Q", buf[i:i + 8])
    if i + 16 + n > len(buf):
      return
    yield buf[i + 12:i + 12 + n]
    i += 16 + n


def read_events(path: str) -> list:
  """The ``Event`` protos of the TensorBoard event file ``path``."""
  from tensorboardX.proto import event_pb2
  return [event_pb2.Event.FromString(r) for r in _records(path)]


def _filter_events(path: str, keep: Callable[[Any], bool]) -> None:
  """Rewrites the event file ``path`` (atomically) without the events ``keep`` refuses,
  and without a record cut short by a kill."""
  events = read_events(path)
  kept = [e for e in events if keep(e)]
  if len(kept) == len(events) and os.path.getsize(path) == sum(16 + e.ByteSize()
                                                               for e in events):
    return

  def write(tmp: str) -> None:
    from tensorboardX.record_writer import RecordWriter
    w = RecordWriter(tmp)
    for e in kept:
      w.write(e.SerializeToString())
    w.close()
  atomic_write(path, write)


def create_writer(workdir: str) -> MetricWriter:
  """The pipeline's writer: enabled on process 0 only."""
  return MetricWriter(workdir, enabled=jax.process_index() == 0)

"""Export and evaluate every deployed form of a quantized run: the packed file, its StableHLO
program, the integer forward, ONNX (run by ONNX Runtime, and by OpenVINO where installed) and
Core ML, each written, read back and evaluated on the test split (:func:`export_and_evaluate`);
the report's ``forms`` entries.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import repvgg_jax
from repvgg_jax.deploy import coreml, onnx, openvino


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def export_and_evaluate(cfg: ml_collections.ConfigDict, q: Any, params: Any, quant: Any,
                        qmodel: Any, eval_loader: Any, workdir: str, primary: bool,
                        bits: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], Any]:
  """Exports the QAT result as ``model.packed`` and ``model.stablehlo`` (and ONNX, Core ML
  as ``cfg.export`` asks), reads each back and evaluates it on ``eval_loader``.

  Returns the report's form entries (``bits``, the weight and activation bits, in each)
  and the deployed model. Every process evaluates the files' contents (process 0's disk
  may not be visible to the others, which use the same objects in memory)."""
  image_shape = eval_loader.image_shape
  packed = repvgg_jax.pack(params, q, quant, repvgg_jax.model_description(
      qmodel, image_size=image_shape[0], mean=eval_loader.mean, std=eval_loader.std,
      variant=cfg.model.name, dataset=eval_loader.dataset))
  path, hlo_path = (os.path.join(workdir, f) for f in ("model.packed", "model.stablehlo"))
  hlo_batch = cfg.export.stablehlo_batch or None
  logging.info("exporting model.packed and model.stablehlo (batch %s)", hlo_batch or "any")
  hlo = repvgg_jax.export_stablehlo(packed, hlo_path if primary else None, batch_size=hlo_batch)
  if primary:
    packed.save(path)
  deployed = repvgg_jax.load_packed(path) if primary else repvgg_jax.DeployedModel(packed)
  exported = jax.export.deserialize(_read(hlo_path) if primary else hlo)
  hlo_fn = jax.jit(exported.call)
  fns = {"packed": deployed,
         "stablehlo": in_batches_of(hlo_fn, hlo_batch) if hlo_batch else hlo_fn}
  if cfg.quant.act_bits and q.int_scales(params, quant) is not None and not qmodel.variant.se:
    fns["integer"] = deployed.integer
  onnx_fns, onnx_entry = export_onnx_form(cfg.export, packed, workdir, primary)
  fns.update(onnx_fns)
  ref = "integer" if "integer" in fns else "packed"
  measured = evaluate_deployed(fns, eval_loader, {"onnx": ref, "openvino": ref})
  forms = {"packed": {"accuracy": measured["packed"]["accuracy"],
                      "size_bytes": int(deployed.size_bytes()), **bits},
           "stablehlo": {"accuracy": measured["stablehlo"]["accuracy"],
                         "size_bytes": len(hlo), **bits}}
  if "integer" in measured:
    forms["integer"] = {**measured["integer"], **bits}
  if onnx_entry is not None:
    forms["onnx"] = {**measured.get("onnx", {}), **onnx_entry, **bits}
  if "openvino" in measured:
    forms["openvino"] = {**measured["openvino"], "size_bytes": onnx_entry["size_bytes"],
                         "precision": "f32", **bits}
  coreml_entry = (export_coreml_form(cfg.export, packed, workdir, image_shape[-1])
                  if primary else None)
  if coreml_entry is not None:
    forms["coreml"] = {**coreml_entry, **bits}
  return forms, deployed


def evaluate_deployed(fns: dict[str, Callable], loader: Any,
                      references: dict[str, str] | None = None,
                      keep_bytes: int = 1 << 30) -> dict[str, dict[str, float]]:
  """Top-1 of each ``fn(uint8 images) -> logits`` over one pass of ``loader`` (each
  process its shard, summed), and the fraction of predictions equal to those of its
  reference (``references[name]``; the first fn's by default), which comes before it.

  One form at a time, each logged as it starts and with its accuracy and seconds when
  done. The first pass keeps the batches while they fit in ``keep_bytes`` and the later
  forms reuse them; a bigger split is read (decoded) again for each form."""
  names = list(fns)
  ref = [names.index((references or {}).get(n, names[0])) for n in names]
  batches = _Replay(loader, keep_bytes)
  totals = np.zeros((len(fns), 3), np.int64)  # correct, count, agree
  preds: list[list[np.ndarray]] = []
  for i, (name, fn) in enumerate(fns.items()):
    logging.info("evaluating %s on the test split", name)
    t0 = time.time()
    preds.append([])
    for k, batch in enumerate(batches):
      mask, labels = np.asarray(batch["mask"]), np.asarray(batch["label"])
      pred = np.asarray(fn(batch["image"])).argmax(-1)
      preds[i].append(pred)
      totals[i] += [((pred == labels) & mask).sum(), mask.sum(),
                    ((pred == preds[ref[i]][k]) & mask).sum()]
    done = totals[i]
    if jax.process_count() > 1:
      done = np.asarray(multihost_utils.process_allgather(done)).sum(axis=0)
    logging.info("%s: top-1 %.2f%% on %d test images, %.1f s", name,
                 100 * done[0] / max(done[1], 1), done[1], time.time() - t0)
  if jax.process_count() > 1:
    totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
  return {name: {"accuracy": t[0] / max(t[1], 1), "agreement": t[2] / max(t[1], 1)}
          for name, t in zip(fns, totals)}


class _Replay:
  """Passes over ``loader``: the first reads it and keeps its batches while they fit in
  ``keep_bytes``; later passes replay them, or read the loader again when they did not fit
  (decoding a large test split once per form is slow; holding it may not fit)."""

  def __init__(self, loader: Any, keep_bytes: int):
    self.loader, self.keep_bytes, self.kept = loader, keep_bytes, None

  def __iter__(self):
    return iter(self.kept) if self.kept is not None else self._read()

  def _read(self):
    kept, size = [], 0
    for batch in self.loader:
      if kept is not None:
        size += sum(np.asarray(v).nbytes for v in batch.values())
        if size <= self.keep_bytes:
          kept.append(batch)
        else:
          kept = None
      yield batch
    self.kept = kept


def in_batches_of(fn: Callable, n: int) -> Callable:
  """``fn`` of a static batch of ``n`` images applied to any batch: in chunks of ``n``,
  the last one padded by repeating its last image (the padding's outputs dropped)."""
  def call(images):
    images, out = np.asarray(images), []
    for i in range(0, len(images), n):
      chunk = images[i:i + n]
      fill = n - len(chunk)
      if fill:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fill, axis=0)])
      out.append(np.asarray(fn(chunk))[:n - fill])
    return np.concatenate(out)
  return call


def onnx_runtime_fn(model: bytes, threads: int | None = None) -> Callable:
  """``f(uint8 images) -> logits`` of an ONNX model run by ONNX Runtime (CPU) on
  ``threads`` intra-op threads (default: the cores of the process's CPU set)."""
  import onnxruntime
  opts = onnxruntime.SessionOptions()
  # ONNX Runtime sizes its pool by the machine's cores, not the process's CPU set:
  # more spinning threads than cores (under taskset, in a container) slow it down.
  if threads is None and hasattr(os, "sched_getaffinity"):
    threads = len(os.sched_getaffinity(0))
  opts.intra_op_num_threads = threads or 0
  session = onnxruntime.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
  return lambda images: session.run(["logits"], {"images": np.asarray(images)})[0]


def wanted(switch: str, available: Callable[[], bool]) -> bool:
  """Whether an exporter runs: its ``cfg.export`` switch ``"on"``, or ``"auto"`` with its
  package importable (``available``); ``"off"`` never."""
  return switch == "on" or (switch == "auto" and available())


def export_coreml_form(ec: ml_collections.ConfigDict, packed: Any, workdir: str,
                       channels: int) -> dict[str, Any] | None:
  """The report entry of ``model.mlpackage`` as ``ec`` (``cfg.export``) asks (process 0
  only), or None when skipped; a model the export refuses gets an entry with the reason
  and no package. Not evaluated: Core ML predicts only on Apple platforms."""
  path = os.path.join(workdir, "model.mlpackage")
  entry = None
  if not wanted(ec.coreml, coreml.available):
    if ec.coreml == "auto":
      logging.info("model.mlpackage skipped: coremltools is not installed "
                   "(pip install 'repvgg-jax[coreml]')")
  else:
    logging.info("exporting model.mlpackage (Core ML, iOS 18 / macOS 15)")
    try:
      repvgg_jax.export_coreml(packed, path, channels=channels)
    except ValueError as e:
      logging.warning("model.mlpackage not written: %s", e)
      entry = {"error": str(e)}
    else:
      entry = {"size_bytes": sum(os.path.getsize(os.path.join(d, f))
                                 for d, _, files in os.walk(path) for f in files)}
  if (entry is None or "error" in entry) and os.path.exists(path):
    shutil.rmtree(path)  # an earlier run's package would not match this model.packed
    logging.info("removed the earlier run's model.mlpackage")
  return entry


def export_onnx_form(ec: ml_collections.ConfigDict, packed: Any, workdir: str,
                     primary: bool) -> tuple[dict[str, Callable], dict[str, Any] | None]:
  """``({"onnx": ONNX Runtime fn, "openvino": OpenVINO fn}, report entry)`` of
  ``model.onnx`` as ``ec`` (``cfg.export``) asks (``"openvino"`` where OpenVINO is
  installed), or ``({}, None)`` when skipped; a model the export refuses gets an entry
  with the reason and no file (the run's other files stand). Process 0 writes the
  file and evaluates what it reads back."""
  path = os.path.join(workdir, "model.onnx")
  entry, fns = None, {}
  if not wanted(ec.onnx, onnx.available):
    if ec.onnx == "auto":
      logging.info("model.onnx skipped: onnx and onnxruntime are not installed "
                   "(pip install 'repvgg-jax[onnx]')")
  else:
    logging.info("exporting model.onnx (activations=%s)", ec.onnx_activations)
    try:
      proto = repvgg_jax.export_onnx(packed, path if primary else None,
                                     activations=ec.onnx_activations)
    except ValueError as e:
      logging.warning("model.onnx not written: %s", e)
      entry = {"error": str(e)}
    else:
      data = _read(path) if primary else proto.SerializeToString()
      entry = {"size_bytes": len(data), "activations": ec.onnx_activations}
      fns["onnx"] = onnx_runtime_fn(data)
      if (ov_fn := openvino.report_fn(data)) is not None:
        fns["openvino"] = ov_fn  # the same file in OpenVINO, where it is installed
  if not fns and primary and os.path.exists(path):
    os.remove(path)  # an earlier run's file would not match this model.packed
    logging.info("removed the earlier run's model.onnx")
  return fns, entry

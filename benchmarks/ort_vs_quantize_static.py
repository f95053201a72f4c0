"""ONNX Runtime speed of our int8-grid ``export_onnx`` against ONNX Runtime's own
``quantize_static`` of the same network, side by side in one process.

The demo network (shallow RepVGG-A0: 1, 2, 4, 1 blocks, A0 widths, 32 px, 10 classes) with
random merged weights. Ours: 4-bit ClusterQAT codebooks on the int8 grid
(``int8_levels=True``), 8-bit activations calibrated on random images, exported by
``export_onnx`` (uint8 activations). Theirs: the float network's export (``act_bits=0``,
the codebook graph; ONNX Runtime's basic optimizations fold its ``Gather`` decode into
float32 initializers) quantized by ``onnxruntime.quantization.quantize_static`` (QDQ,
per-channel, QUInt8 activations, QInt8 weights, min-max on the same random images). Both
run with every graph optimization on ``--threads`` intra-op threads; the optimized graphs'
op counts are printed first.

  taskset -c 0 python benchmarks/ort_vs_quantize_static.py [--threads 1] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime import quantization as oq

import bench_common as bc
import repvgg_jax as rv
from runtimes import NETS, _packed


def _session(model: bytes | str, threads: int, optimized: str | None = None,
             level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
  so = ort.SessionOptions()
  so.graph_optimization_level = level
  so.intra_op_num_threads = threads
  if optimized:
    so.optimized_model_filepath = optimized
  return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class _Images(oq.CalibrationDataReader):
  def __init__(self, batches):
    self.it = iter([{"images": b} for b in batches])

  def get_next(self):
    return next(self.it, None)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args()
  _, variant, size, classes = NETS["demo"]
  ours = rv.export_onnx(_packed(variant, size, classes, 8, True)).SerializeToString()
  tmp = tempfile.mkdtemp()
  folded = os.path.join(tmp, "float.onnx")
  _session(rv.export_onnx(_packed(variant, size, classes, 0, False)).SerializeToString(),
           args.threads, folded, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
  rng = np.random.default_rng(1)
  calib = [rng.integers(0, 256, (8, size, size, 3), np.uint8) for _ in range(2)]
  theirs = os.path.join(tmp, "quantize_static.onnx")
  oq.quantize_static(folded, theirs, _Images(calib), quant_format=oq.QuantFormat.QDQ,
                     per_channel=True, activation_type=oq.QuantType.QUInt8,
                     weight_type=oq.QuantType.QInt8)
  sessions = {}
  for name, model in (("export_onnx int8 grid", ours), ("quantize_static", theirs)):
    path = os.path.join(tmp, name.replace(" ", "_") + ".opt.onnx")
    sessions[name] = _session(model, args.threads, path)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    print(f"{name}: {dict(sorted(ops.items()))}")
  for batch in (int(b) for b in args.batches.split(",")):
    images = np.random.default_rng(2).integers(0, 256, (batch, size, size, 3), np.uint8)
    fns = {k: (lambda s=s: s.run(["logits"], {"images": images})) for k, s in sessions.items()}
    t = bc.time_interleaved(fns, args.repeats, min_sample_s=0.5)
    base = t["quantize_static"]["ms"]
    print(f"\n## batch {batch}\n\n| ONNX model | ms per batch | vs quantize_static |\n|---|---:|---:|")
    for k, r in t.items():
      print(f"| {k} | {bc.fmt_ms(r)} | {bc.ratio(base, r['ms'])} |")


if __name__ == "__main__":
  main()

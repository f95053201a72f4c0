"""ONNX Runtime alone: our int8-grid ``export_onnx`` against ONNX Runtime's own
``quantize_static`` of the same network, the optimized graphs' op counts and their speed
side by side in one process (runtimes.py times the same two files among every runtime).

The demo network (shallow RepVGG-A0: 1, 2, 4, 1 blocks, A0 widths, 32 px, 10 classes;
``--net a0``: RepVGG-A0 at 224 px) with random merged weights. Ours: 4-bit ClusterQAT
codebooks on the int8 grid (``int8_levels=True``), 8-bit activations calibrated on random
images, exported by ``export_onnx(..., integer=True)`` (uint8 activations). Theirs: the
float merged network's export (no kernel quantized, ``act_bits=0``) quantized by
``onnxruntime.quantization.quantize_static`` (``bench_common.quantize_static_onnx``: QDQ,
per-channel, QUInt8 activations, QInt8 weights, min-max on random images). Both run with
every graph optimization on ``--threads`` intra-op threads; the optimized graphs' op
counts are printed first.

  taskset -c 0 python benchmarks/ort_vs_quantize_static.py [--threads 1] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile

import numpy as np
import onnx

import bench_common as bc
import repvgg_jax as rv


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--net", default="demo", choices=sorted(bc.NETS))
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args()
  size = bc.NETS[args.net][2]
  ours = rv.export_onnx(bc.packed_model(args.net, 8, "int8_grid"), integer=True)
  theirs = bc.quantize_static_onnx(
      rv.export_onnx(bc.packed_model(args.net, 0, "float")).SerializeToString(),
      bc.calibration_images(args.net, batches=2))
  sessions = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, model in (("export_onnx int8 grid", ours.SerializeToString()),
                        ("quantize_static", theirs)):
      path = os.path.join(tmp, name.replace(" ", "_") + ".opt.onnx")
      sessions[name] = bc.ort_session(model, args.threads, path)
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

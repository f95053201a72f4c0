"""Where OpenVINO spends the time of our int8-grid ONNX and of ``quantize_static``'s file.

The two files of ``runtimes.py``'s goal row (the same random merged network: ours from
``export_onnx(integer=True)``, ONNX Runtime's ``quantize_static`` W8A8 of its float export),
compiled by OpenVINO's CPU plugin (f32 hint, ``--threads``) with ``PERF_COUNT`` on; per
file: the wall ms of an inference, the executed nodes' time summed by type and kernel, and
each convolution's time (mean over ``--runs`` inferences after 5 warm-up ones).

  taskset -c 0 python benchmarks/openvino_profile.py [--net demo|a0] [--batch 32]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import numpy as np

import bench_common as bc
import repvgg_jax as rv


def profile(path: str, images: np.ndarray, threads: int, runs: int) -> tuple[float, dict, dict]:
  import openvino as ov
  compiled = ov.Core().compile_model(path, "CPU", {
      "PERF_COUNT": "YES", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
  req = compiled.create_infer_request()
  for _ in range(5):
    req.infer({0: images})
  by_type, convs = collections.Counter(), collections.Counter()
  start = time.perf_counter()
  for _ in range(runs):
    req.infer({0: images})
    for info in req.profiling_info:
      if info.status == info.status.EXECUTED:
        ms = info.real_time.total_seconds() * 1e3 / runs
        by_type[(info.node_type, info.exec_type)] += ms
        if info.node_type == "Convolution":
          convs[info.node_name.split("/")[0]] += ms
  return (time.perf_counter() - start) / runs * 1e3, by_type, convs


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--net", default="demo", choices=sorted(bc.NETS))
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--runs", type=int, default=20)
  args = ap.parse_args()
  print(bc.header("OpenVINO profile: ours int8 grid against quantize_static", notes=(
      f"openvino {bc._dist_version('openvino')}, onnxruntime {bc._dist_version('onnxruntime')}",
      f"net {args.net}, batch {args.batch}, threads {args.threads}, runs {args.runs}")))
  files = {"ours int8 grid": rv.export_onnx(bc.packed_model(args.net, 8, "int8_grid"),
                                            integer=True).SerializeToString(),
           "quantize_static W8A8": bc.quantize_static_onnx(
               rv.export_onnx(bc.packed_model(args.net, 0, "float")).SerializeToString(),
               bc.calibration_images(args.net))}
  size = bc.NETS[args.net][2]
  images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), np.uint8)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, data in files.items():
      path = os.path.join(tmp, "model.onnx")
      with open(path, "wb") as f:
        f.write(data)
      results[name] = profile(path, images, args.threads, args.runs)
  names = list(results)
  print(f"\n| | {' | '.join(names)} |\n|---|" + "---:|" * len(names))
  print("| wall ms | " + " | ".join(f"{results[n][0]:.2f}" for n in names) + " |")
  keys = sorted({k for n in names for k in results[n][1]},
                key=lambda k: -max(results[n][1].get(k, 0) for n in names))
  for k in keys:
    print(f"| {k[0]} ({k[1]}) | " + " | ".join(f"{results[n][1].get(k, 0):.3f}" for n in names)
          + " |")
  for layer in results[names[0]][2]:
    print(f"| conv {layer} | " + " | ".join(f"{results[n][2].get(layer, 0):.3f}" for n in names)
          + " |")


if __name__ == "__main__":
  main()

"""File sizes of the codebook ``model.onnx`` against the packed file it is exported from.

The demo network (shallow RepVGG-A0: 1, 2, 4, 1 blocks, A0 widths, 32 px, 10 classes;
``--nets demo,a0`` adds RepVGG-A0 at 224 px) with random merged weights: sizes depend on
shapes and bits, not on training. Per bit width: ClusterQAT codebooks per output channel
(stem and head at 8 bits), 8-bit activations calibrated on random images
(``bench_common.packed_model``); the packed file's bytes (``PackedModel.size_bytes``) and
``export_onnx``'s (the serialized ``ModelProto``: the packed file's bit-packed index bytes
as they are, decoded in the graph).

  taskset -c 0 python benchmarks/onnx_size.py [--nets demo] [--bits 2,3,4]
"""

from __future__ import annotations

import argparse

import bench_common as bc
import repvgg_jax as rv


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--nets", default="demo")
  ap.add_argument("--bits", default="2,3,4")
  args = ap.parse_args()
  print(bc.header("model.onnx size against model.packed", notes=(
      f"onnx {bc._dist_version('onnx')}, onnxruntime {bc._dist_version('onnxruntime')}",)))
  print("| network | bits (stem/head 8) | model.packed bytes | model.onnx bytes | onnx / packed |")
  print("|---|---:|---:|---:|---:|")
  for net in args.nets.split(","):
    for bits in (int(b) for b in args.bits.split(",")):
      packed = bc.packed_model(net, 8, "codebook", bits)
      onnx_bytes = len(rv.export_onnx(packed).SerializeToString())
      print(f"| {bc.NETS[net][0]} | {bits} | {packed.size_bytes():,} | {onnx_bytes:,} | "
            f"{onnx_bytes / packed.size_bytes():.3f} |")


if __name__ == "__main__":
  main()

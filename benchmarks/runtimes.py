"""Inference throughput of one W4A8 model in every runtime it deploys to, side by side.

Two networks, each with random merged weights (speed depends on shapes and kernels,
not on training), 4-bit ClusterQAT codebooks (stem and head at 8 bits) and 8-bit
activations calibrated on random images: the demo's (shallow RepVGG-A0, 1, 2, 4, 1
blocks, 32 px) and RepVGG-A0 (2, 4, 14, 1 blocks, 224 px, ImageNet stem, 1000
classes). Each at batch 1 and 32; rows of one (network, batch) timed interleaved in
one process (``bench_common.time_interleaved``), each runtime on ``--threads``:

- JAX ``load_packed`` (float convs of the kernels decoded at load, fake-quantized activations)
- JAX ``DeployedModel.integer`` (int8 x int8 -> int32 convs)
- ONNX Runtime, ``export_onnx`` of int8-grid codebooks, uint8 activations (``QLinearConv``)
- ONNX Runtime, the same model exported as codebooks (``Gather`` decode, float convs)
- ONNX Runtime, float activations (``act_bits=0``): the float32 graph without QDQ
- IREE (llvm-cpu, host CPU) running ``export_stablehlo(batch_size=B)``, when installed:
  as compiled by default (the codebook decode runs in every call) and with
  ``bench_common.IREE_FOLD_DECODE`` (decoded once, into a larger module)

JAX's thread count is XLA's (all cores of the process's CPU set): run the script under
``taskset -c 0-<threads-1>`` so that every runtime sees the same cores.

  taskset -c 0,1 python benchmarks/runtimes.py [--threads 2] [--batches 1,32] [--nets demo,a0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import bench_common as bc
import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG, VARIANTS, Variant
from repvgg_jax.train.export import onnx_runtime_fn

MEAN, STD = (0.286,) * 3, (0.353,) * 3


def _packed(variant: Variant, size: int, classes: int, act_bits: int, int8_levels: bool):
  model = RepVGG(variant, num_classes=classes)
  merged = jax.device_get(rv.merge(bc.random_variables(model, (size, size, 3)))["params"])
  q = rv.make_quantizer("cluster", bits=4, int8_levels=int8_levels)
  state = q.init(merged)
  deploy = RepVGG(variant, num_classes=classes, deploy=True, act_bits=act_bits)
  if act_bits:
    rng = np.random.default_rng(1)
    batches = [rv.deploy.normalize_images(
        rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8), MEAN, STD)]
    state = rv.calibrate(deploy, {"params": q.apply(merged, state), "quant": state}, batches)
  return rv.pack(merged, q, state, rv.model_description(deploy, image_size=size, mean=MEAN, std=STD))


NETS = {"demo": ("shallow RepVGG-A0 (1, 2, 4, 1 blocks), 32 px, 10 classes",
                 Variant((1, 2, 4, 1), VARIANTS["RepVGG-A0"].widths), 32, 10),
        "a0": ("RepVGG-A0 (2, 4, 14, 1 blocks), 224 px, 1000 classes",
               VARIANTS["RepVGG-A0"], 224, 1000)}
JAX_ROW, ORT_INT8, ORT_FLOAT = ("JAX load_packed (float convs)",
                                "ONNX Runtime int8 QDQ (QLinearConv)",
                                "ONNX Runtime float32 (no QDQ)")


def _table(net: str, batch: int, args) -> str:
  title, variant, size, classes = NETS[net]
  grid, codebook, float_act = (_packed(variant, size, classes, 8, True),
                               _packed(variant, size, classes, 8, False),
                               _packed(variant, size, classes, 0, False))
  images = np.random.default_rng(2).integers(0, 256, (batch, size, size, 3), np.uint8)
  deployed = rv.DeployedModel(grid)
  fns = {JAX_ROW: lambda x: deployed(x),
         "JAX integer (int8 convs)": lambda x: deployed.integer(x)}
  try:
    ort = lambda p: onnx_runtime_fn(rv.export_onnx(p).SerializeToString(),  # noqa: E731
                                    args.threads)
    fns[ORT_INT8] = ort(grid)
    fns["ONNX Runtime codebook graph (float convs)"] = ort(codebook)
    fns[ORT_FLOAT] = ort(float_act)
  except ImportError as e:
    print(f"ONNX rows skipped: {e}")
  exported = jax.export.deserialize(rv.export_stablehlo(grid, batch_size=batch))
  iree = bc.iree_fn(exported, args.threads)
  if iree is not None:
    fns["IREE llvm-cpu (model.stablehlo)"] = iree
    fns["IREE llvm-cpu, decode folded at compile"] = bc.iree_fn(exported, args.threads,
                                                                fold_decode=True)
  timed = {k: (lambda f=f: jax.block_until_ready(jnp.asarray(f(images)))) for k, f in fns.items()}
  t = bc.time_interleaved(timed, args.repeats, min_sample_s=0.5)
  ort_float = t.get(ORT_FLOAT, {}).get("ms")
  out = [f"## {title}, batch {batch}", "",
         "| runtime | ms per batch | images/s | vs JAX load_packed | vs ONNX Runtime float32 |",
         "|---|---:|---:|---:|---:|"]
  for k, r in t.items():
    out.append(f"| {k} | {bc.fmt_ms(r)} | {batch / r['ms'] * 1e3:,.0f} | "
               f"{bc.ratio(t[JAX_ROW]['ms'], r['ms'])} | {bc.ratio(ort_float, r['ms'])} |")
  return "\n".join(out) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--nets", default="demo,a0", help=f"of {sorted(NETS)}")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args()
  print(bc.header("Deployed W4A8 inference in every runtime", notes=(
      f"threads per runtime: {args.threads} (ONNX Runtime intra-op, IREE task topology "
      "groups, JAX: the CPU set)", f"repeats {args.repeats}; ms per batch: median (min-max) "
      "over repeats; ratios: the other row's ms over this row's (> 1: this row is faster)")))
  for net in args.nets.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      print(_table(net, batch, args), flush=True)


if __name__ == "__main__":
  main()

"""What distillation costs a QAT step: the W4A8 ClusterQAT step of the merged network with and
without ``qat.distill="logits"`` (one teacher forward of the frozen float network per step),
timed interleaved in one process (``bench_common.time_interleaved``).

  python -m benchmarks.distill_step [--blocks 1,2,4,1] [--batch 64] [--size 32] [--repeats 5]

Prints a Markdown table: ms per step (median, min-max over repeats) and the ratio.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import repvgg_jax as rv
from benchmarks.bench_common import fmt_ms, header, random_variables, ratio, time_interleaved
from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.config import base_config
from repvgg_jax.train.state import create_train_state


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--blocks", default="1,2,4,1", help="blocks per stage of RepVGG-A0")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--conv_impl", default="auto", choices=("auto", "xla"))
  args = ap.parse_args(argv)
  blocks = tuple(int(b) for b in args.blocks.split(","))
  variant = rv.VARIANTS["RepVGG-A0"].__class__(blocks, rv.VARIANTS["RepVGG-A0"].widths)
  image = (args.size, args.size, 3)
  train_form = RepVGG(variant, num_classes=10, norm="oabn", conv_impl=args.conv_impl)
  merged = jax.device_get(rv.merge(random_variables(train_form, image)))
  deploy = RepVGG(variant, num_classes=10, deploy=True, conv_impl=args.conv_impl)
  qmodel = RepVGG(variant, num_classes=10, deploy=True, act_bits=8, conv_impl=args.conv_impl)
  q = rv.make_quantizer("cluster", bits=4)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, *image)).astype(np.float32)
  # Host copies: each state is replicated from them, and each step donates its state.
  quant = jax.device_get(rv.calibrate(
      qmodel, {"params": q.apply(merged["params"], q.init(merged["params"])),
               "quant": q.init(merged["params"])}, [x]))
  cfg = base_config().qat
  mesh = sharding.make_mesh()
  batch = sharding.shard_batch(
      {"image": rng.standard_normal((args.batch, *image)).astype(np.float32),
       "label": rng.integers(0, 10, args.batch).astype(np.int32)}, mesh)
  teacher = steps.Distill(apply=lambda p, im: deploy.apply({"params": p}, im, train=False),
                          variables=merged["params"], weight=0.5, temperature=2.0)
  states, fns = {}, {}
  for name, distill in (("plain", None), ("distilled", teacher)):
    step = steps.make_train_step(mesh, 10, quantizer=q, distill=distill)
    states[name] = sharding.replicate(create_train_state(qmodel, merged, cfg, quant=quant), mesh)

    def run(name=name, step=step):
      states[name], metrics = step(states[name], batch)
      jax.block_until_ready(metrics["loss"])
    fns[name] = run
  t = time_interleaved(fns, args.repeats, min_sample_s=1.0)
  print(header("QAT step with and without distillation",
               notes=(f"RepVGG-A0 blocks {blocks}, {args.size} px, batch {args.batch}, W4A8 "
                      f"ClusterQAT, conv_impl={args.conv_impl}",)))
  print("| step | ms per step | relative |\n|---|---:|---:|")
  for name in fns:
    print(f"| {name} | {fmt_ms(t[name])} | {ratio(t[name]['ms'], t['plain']['ms'])} |")


if __name__ == "__main__":
  main()

"""Peak host memory of one FP training step, and packed model size per variant.

1. Peak RSS (``getrusage().ru_maxrss``) of the train form's FP training step
   (the repo's ``make_train_step``: SGD momentum, softmax cross entropy, BN
   stats updated), each measurement in a fresh subprocess so peaks don't mix.
   The peak is read after each phase (it only grows): imports, model and
   state built, step compiled, first step run. Where Linux lets a process
   reset its peak (``/proc/self/clear_refs``), the peak of a second step
   alone is given too, with the RSS just before it.
2. Packed size of the deploy form at 4 bits (per-channel codebooks) vs
   float32. Sizes depend only on shapes, so the params are random and the
   uniform quantizer's codebooks stand in for k-means ones (same sizes).

  python benchmarks/memory.py [--variants RepVGG-A0,RepVGG-B0] [--size-variants all]
  python benchmarks/memory.py --quick   # tiny sizes, a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MIB = 1 << 20


def maxrss_bytes() -> int:
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r if sys.platform == "darwin" else r * 1024  # Linux: KiB


def proc_status(field: str) -> int | None:
  """``VmRSS`` / ``VmHWM`` of this process in bytes, or None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def reset_peak() -> bool:
  """Resets this process's peak RSS (``VmHWM``); False where not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


# ---------------------------------------------------------------- child


def child(spec: dict) -> dict:
  """One measurement; runs in its own process."""
  out = {}
  import jax
  import numpy as np

  import bench_common as bc
  from repvgg_jax.train import sharding, steps
  from repvgg_jax.train.config import base_config
  from repvgg_jax.train.state import build_model, create_train_state
  out["imports"] = maxrss_bytes()

  px, batch_size, classes = spec["px"], spec["batch"], spec["classes"]
  cfg = base_config()
  cfg.model.name = spec["variant"]
  cfg.model.norm = spec["norm"]
  cfg.fp.batch_size = batch_size
  model = build_model(cfg.model, classes, deploy=False)
  mesh = sharding.make_mesh()
  state = sharding.replicate(create_train_state(model, bc.random_variables(model, (px, px, 3)), cfg.fp),
                             mesh)
  rng = np.random.default_rng(0)
  batch = sharding.shard_batch(
      {"image": rng.standard_normal((batch_size, px, px, 3), dtype=np.float32),
       "label": rng.integers(0, classes, batch_size).astype(np.int32)}, mesh)
  jax.block_until_ready((state, batch))
  out["state"] = maxrss_bytes()

  t = time.perf_counter()
  step = steps.make_train_step(mesh, classes, 0.0).lower(state, batch).compile()
  out["compile_s"] = time.perf_counter() - t
  out["compile"] = maxrss_bytes()

  t = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  out["step_s"] = time.perf_counter() - t
  out["step"] = maxrss_bytes()

  out["rss_before_step2"] = proc_status("VmRSS")
  if reset_peak() and proc_status("VmHWM") is not None:
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    out["step2_peak"] = proc_status("VmHWM")
  out["loss"] = float(metrics["loss"])
  return out


def run_child(spec: dict, timeout: float | None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  lines = p.stdout.strip().splitlines()
  if p.returncode or not lines:
    err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
    return {"error": f"exit code {p.returncode}: {err}"}
  return json.loads(lines[-1])


# ---------------------------------------------------------------- parent


def mib(v: int | None) -> str:
  return "n/a" if v is None else f"{v / MIB:,.0f}"


def rss_table(args, shapes) -> None:
  print("\n## Peak RSS of one FP training step (train form), MiB\n")
  print(f"Each row is a fresh process; norm {args.norm.upper()}; cumulative peak "
        "(`ru_maxrss`) after each phase; the last columns are the second step alone.\n")
  print("| variant | input | classes | after imports | model + state | step compiled | "
        "first step | RSS before step 2 | step 2 peak | compile s | first step s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for variant in args.variants:
    for px, batch, classes in shapes:
      spec = dict(variant=variant, px=px, batch=batch, classes=classes, norm=args.norm)
      r = run_child(spec, args.timeout)
      head = f"| {variant} | {px} px x {batch} | {classes} |"
      if "error" in r:
        print(f"{head} failed: {r['error']} | | | | | | | |", flush=True)
        continue
      print(f"{head} {mib(r['imports'])} | {mib(r['state'])} | {mib(r['compile'])} | "
            f"{mib(r['step'])} | {mib(r.get('rss_before_step2'))} | "
            f"{mib(r.get('step2_peak'))} | {r['compile_s']:.1f} | {r['step_s']:.2f} |",
            flush=True)


def size_table(variants) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import repvgg_jax as rv
  print("\n## Packed size of the deploy form at 4 bits (per-channel codebooks), 1000 classes\n")
  print("| variant | deploy params | float32 MB | packed MB, stem/head 8-bit | ratio | "
        "packed MB, all 4-bit | ratio |")
  print("|---|---|---|---|---|---|---|")
  x = jnp.zeros((1, 224, 224, 3), jnp.float32)
  for variant in variants:
    model = rv.create_model(variant, num_classes=1000, deploy=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    f32 = 4 * n
    sizes = []
    for fl in (8, None):
      q = rv.make_quantizer("uniform", bits=4, first_last_bits=fl)
      sizes.append(rv.pack(params, q, q.init(params)).size_bytes())
    print(f"| {variant} | {n:,} | {f32 / 1e6:.2f} | {sizes[0] / 1e6:.2f} | "
          f"{f32 / sizes[0]:.2f}x | {sizes[1] / 1e6:.2f} | {f32 / sizes[1]:.2f}x |", flush=True)
    del params


def main() -> None:
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(json.dumps(child(json.loads(sys.argv[2]))))
    return
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="small inputs, A0 only: a smoke test, not a measurement")
  p.add_argument("--variants", default="RepVGG-A0",
                 help="comma list of variants for the RSS table")
  p.add_argument("--size-variants", default=None,
                 help="comma list, or 'all' (default; quick: RepVGG-A0), for the size table")
  p.add_argument("--norm", choices=("bn", "oabn"), default="bn")
  p.add_argument("--only", choices=("rss", "size"), default=None)
  p.add_argument("--timeout", type=float, default=None, help="seconds per subprocess")
  args = p.parse_args()

  import repvgg_jax as rv
  import bench_common as bc
  args.variants = args.variants.split(",")
  if args.size_variants is None:
    args.size_variants = "RepVGG-A0" if args.quick else "all"
  size_variants = (rv.list_models() if args.size_variants == "all"
                   else args.size_variants.split(","))
  bad = sorted(set(args.variants + size_variants) - set(rv.list_models()))
  if bad:
    p.error(f"unknown variant(s) {bad}; known: {rv.list_models()}")
  shapes = ((32, 8, 10), (64, 4, 1000)) if args.quick else ((32, 64, 10), (224, 8, 1000))
  notes = ["QUICK MODE: small inputs, A0 only: a smoke test, not results"] if args.quick else []
  notes.append("initial params drawn in NumPy (bench_common.random_variables), not by a compiled "
               "model.init")
  print(bc.header("RepVGG memory (CPU)", None, tuple(notes)), flush=True)
  start = time.perf_counter()
  if args.only in (None, "rss"):
    rss_table(args, shapes)
  if args.only in (None, "size"):
    size_table(size_variants)
  print(f"\nwall time {time.perf_counter() - start:.0f} s, load average at end: {bc.load_avg()}")


if __name__ == "__main__":
  main()

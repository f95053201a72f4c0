"""Accelerator speed of RepVGG-A0 at 224 px: training step, deploy inference, ClusterQAT vs FP, timm.

One self-contained run on whatever device JAX sees first (GPU, TPU or CPU):

1. Training step of the train form (multi-branch, BN), bf16 compute, float32
   params: the repo's ``make_train_step`` (SGD momentum, softmax cross entropy,
   BN batch statistics, uint8 images normalized inside the step). images/s, and
   MFU = XLA's FLOP count of the compiled step / step time / the device's peak
   dense bf16 FLOP/s (from ``PEAK_BF16_TFLOPS`` by device kind, or ``--peak-tflops``).
2. Deploy-form (merged) inference, bf16: images/s.
3. Training step of the deploy form with 4-bit ClusterQAT vs without (FP):
   the ratio of step times (the goal is <= 1.05x).
4. timm's ``repvgg_a0`` training step on the same device, AMP (bf16 autocast)
   and channels_last, SGD momentum, when ``torch`` and ``timm`` import.

Batches are device-resident and fixed (no input pipeline; see
``input_pipeline.py``); every timing is the median over ``--repeats`` windows of
``--steps`` steps after ``--warmup`` steps, ended by a device sync. Results:
a JSON file (``--json``) and a Markdown table on stdout.

Needs only jax, flax, optax, numpy and this repository (no ml_collections,
tfds or grain), so it runs on a bare accelerator image:

  python benchmarks/accelerator.py                       # A0, 224 px, batch 256
  python benchmarks/accelerator.py --batch 128 --torch none
  python benchmarks/accelerator.py --tiny --torch none   # seconds on a CPU: a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import repvgg_jax as rv  # noqa: E402
from benchmarks import bench_common  # noqa: E402
from repvgg_jax.models.repvgg import RepVGG, Variant  # noqa: E402
from repvgg_jax.train import sharding, steps  # noqa: E402
from repvgg_jax.data.transforms import normalize  # noqa: E402
from repvgg_jax.train.state import create_train_state  # noqa: E402

# Peak dense bf16 TFLOP/s by device kind (vendor data sheets; SXM parts, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY = Variant((1, 1, 1, 1), (0.25, 0.25, 0.25, 0.25))


def peak_tflops(kind: str) -> float | None:
  for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
    if key.lower() in kind.lower():
      return PEAK_BF16_TFLOPS[key]
  return None


def _flops(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled computation (None where the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  value = (cost or {}).get("flops")
  return float(value) if value and value > 0 else None


def _windows(run: Callable[[], None], sync: Callable[[], None], steps_: int, warmup: int,
             repeats: int) -> list[float]:
  """Seconds per call of ``run``, one value per window of ``steps_`` calls."""
  for _ in range(warmup):
    run()
  sync()
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps_):
      run()
    sync()
    out.append((time.perf_counter() - t) / steps_)
  return out


def _stage(batch: int) -> Any:
  """The optimizer fields ``create_train_state`` reads: SGD momentum, constant small lr."""
  return types.SimpleNamespace(base_lr=1e-3 * 256 / batch, batch_size=batch, warmup_steps=0,
                               num_steps=10 ** 9, momentum=0.9, nesterov=False,
                               weight_decay=1e-4, grad_clip_norm=0.0, quant_lr_scale=1.0)


class JaxStep:
  """A jitted train step, its state and batch; ``run`` advances one step."""

  def __init__(self, mesh, model, variables, batch, classes, quantizer=None, quant=None):
    self.fn = steps.make_train_step(mesh, classes, 0.0, quantizer,
                                    pixel_stats=(np.asarray(IMAGENET_MEAN, np.float32),
                                                 np.asarray(IMAGENET_STD, np.float32)))
    self.state = sharding.replicate(
        create_train_state(model, variables, _stage(batch["image"].shape[0]), quant=quant),
        mesh)
    self.batch = sharding.shard_batch(batch, mesh)
    t = time.perf_counter()
    self.compiled = self.fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t
    self.flops = _flops(self.compiled)
    self.metrics = None

  def run(self) -> None:
    self.state, self.metrics = self.compiled(self.state, self.batch)

  def sync(self) -> None:
    jax.block_until_ready((self.state, self.metrics))


def jax_rows(args, device) -> dict:
  mesh = sharding.make_mesh([device])
  px, b, classes = args.size, args.batch, args.classes
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
  if args.tiny:
    model = RepVGG(TINY, num_classes=classes, dtype=dtype)
  else:
    model = rv.create_model(args.model, num_classes=classes, dtype=dtype)
  deploy = model.clone(deploy=True)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (b, px, px, 3), dtype=np.uint8),
           "label": rng.integers(0, classes, b).astype(np.int32)}
  variables = bench_common.random_variables(model, (px, px, 3))
  merged = jax.device_get(jax.jit(rv.merge)(variables))
  rows: dict = {}

  def train_row(key, step: JaxStep) -> None:
    w = _windows(step.run, step.sync, args.steps, args.warmup, args.repeats)
    s = statistics.median(w)
    rows[key] = {"s_per_step": s, "min_s": min(w), "max_s": max(w),
                 "images_per_s": b / s, "compile_s": step.compile_s, "flops": step.flops}

  train_row("train form FP", JaxStep(mesh, model, variables, batch, classes))
  train_row("deploy FP", JaxStep(mesh, deploy, merged, batch, classes))
  q = rv.make_quantizer("cluster", bits=4)
  t = time.perf_counter()
  quant = q.init(merged["params"])
  init_s = time.perf_counter() - t
  train_row("deploy ClusterQAT 4-bit", JaxStep(mesh, deploy, merged, batch, classes, q, quant))
  rows["deploy ClusterQAT 4-bit"]["codebook_init_s"] = init_s

  # Inference of the deploy form.
  images = jax.device_put(jnp.asarray(batch["image"]), sharding.batch_sharding(mesh))
  params = sharding.replicate(merged, mesh)
  mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
  infer = jax.jit(lambda v, x: deploy.apply(v, normalize(x, mean, std)))
  t = time.perf_counter()
  compiled = infer.lower(params, images).compile()
  compile_s = time.perf_counter() - t
  holder = {}
  w = _windows(lambda: holder.__setitem__("y", compiled(params, images)),
               lambda: jax.block_until_ready(holder["y"]), args.steps, args.warmup,
               args.repeats)
  s = statistics.median(w)
  rows["deploy inference"] = {"s_per_step": s, "min_s": min(w), "max_s": max(w),
                              "images_per_s": b / s, "compile_s": compile_s,
                              "flops": _flops(compiled)}
  return rows


def timm_row(args) -> dict | str:
  """timm's repvgg_a0 training step (AMP bf16, channels_last), or why it was not run."""
  try:
    import torch
    import torch.nn.functional as F
    import timm
  except Exception as e:  # noqa: BLE001 (timm also fails when torchvision does not match)
    return f"not run: {type(e).__name__}: {e}"
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = timm.create_model(args.timm_model, pretrained=False, num_classes=args.classes)
  model = model.to(dev).to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
  x = x.to(memory_format=torch.channels_last)
  y = torch.randint(0, args.classes, (args.batch,), device=dev)

  def step():
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
      loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  w = _windows(step, sync, args.steps, args.warmup, args.repeats)
  s = statistics.median(w)
  return {"s_per_step": s, "min_s": min(w), "max_s": max(w), "images_per_s": args.batch / s,
          "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
          "torch": torch.__version__, "timm": timm.__version__}


def _rate(images_per_s: float) -> str:
  return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.1f}"


def markdown(result: dict) -> str:
  r, m = result["rows"], result["meta"]
  peak = m["peak_tflops"]
  lines = [f"RepVGG-A0 ({'tiny' if m['tiny'] else m['model']}), {m['size']} px, batch "
           f"{m['batch']}, {m['dtype']} compute, on {m['device_kind']} ({m['platform']}); "
           f"jax {m['jax']}, {m['date']}", "",
           "| row | ms/step median (min-max) | images/s | MFU | compile s |",
           "|---|---|---:|---:|---:|"]
  for key, row in r.items():
    mfu = (f"{100 * row['flops'] / row['s_per_step'] / (peak * 1e12):.1f}%"
           if peak and row.get("flops") and "inference" not in key else "")
    lines.append(f"| {key} | {1e3 * row['s_per_step']:.2f} ({1e3 * row['min_s']:.2f}-"
                 f"{1e3 * row['max_s']:.2f}) | {_rate(row['images_per_s'])} | {mfu} | "
                 f"{row.get('compile_s', 0):.1f} |")
  t = result["timm"]
  if isinstance(t, dict):
    lines.append(f"| timm {m['timm_model']} train step (AMP bf16, channels_last; "
                 f"torch {t['torch']}, timm {t['timm']}) | {1e3 * t['s_per_step']:.2f} "
                 f"({1e3 * t['min_s']:.2f}-{1e3 * t['max_s']:.2f}) | "
                 f"{_rate(t['images_per_s'])} | | |")
  lines += ["", "| ratio | value | goal |", "|---|---:|---|"]
  for key, (value, goal) in result["ratios"].items():
    text = "n/a" if value is None else _rate(value) if "images/s" in key else f"{value:.2f}"
    lines.append(f"| {key} | {text} | {goal} |")
  if not isinstance(t, dict):
    lines += ["", f"timm: {t}"]
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="RepVGG-A0")
  p.add_argument("--timm-model", default="repvgg_a0")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--steps", type=int, default=30, help="steps per timing window")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--torch", default="auto", choices=("auto", "none"),
                 help="auto: time timm's model too when torch and timm import")
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="peak bf16 TFLOP/s for MFU (default: from the device kind)")
  p.add_argument("--tiny", action="store_true",
                 help="a tiny RepVGG at 32 px, batch 8, 2 steps: a smoke test on CPU")
  p.add_argument("--json", default="accelerator_results.json")
  args = p.parse_args(argv)
  if args.tiny:
    args.size, args.batch, args.classes = 32, 8, 10
    args.steps, args.warmup, args.repeats = 2, 1, 1
  device = jax.devices()[0]
  kind = device.device_kind
  meta = {"model": args.model, "timm_model": args.timm_model, "tiny": args.tiny,
          "size": args.size, "batch": args.batch, "classes": args.classes,
          "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
          "repeats": args.repeats, "device_kind": kind, "platform": device.platform,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "jaxlib": getattr(jax.lib, "__version__", ""), "python": platform.python_version(),
          "host_cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(["python", "benchmarks/accelerator.py"] + sys.argv[1:]),
          "peak_tflops": args.peak_tflops or peak_tflops(kind)}
  rows = jax_rows(args, device)
  timm = timm_row(args) if args.torch == "auto" else "not run: --torch none"
  fp, qat = rows["deploy FP"], rows["deploy ClusterQAT 4-bit"]
  ours = rows["train form FP"]["images_per_s"]
  ratios = {
      "train form images/s (goal on H100/H200)": (ours, ">= 6,000"),
      "ClusterQAT step / FP step (deploy form)": (qat["s_per_step"] / fp["s_per_step"],
                                                  "<= 1.05"),
      "ours / timm, train-form training step": (
          ours / timm["images_per_s"] if isinstance(timm, dict) else None, ">= 1.2"),
  }
  result = {"meta": meta, "rows": rows, "timm": timm, "ratios": ratios}
  print(markdown(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

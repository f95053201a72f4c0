"""Where a ``configs/folder.py`` run spends its time: the image folder (scan, statistics,
PNG decode) against the model's steps.

Writes Fashion-MNIST images (the Debian package's IDX files) as PNGs in torchvision's
ImageFolder layout (``DIR/train/<class>/*.png``, ``DIR/val/<class>/*.png``), then times,
one after the other in this process:

1. the loader's start: the file scan and the normalization statistics (computed from up
   to 2,000 training images, then cached in the workdir),
2. the loader alone: batches of ``configs/folder.py`` (pad-crop-flip at 32 px), images/s,
3. the train step alone on those batches, for the folder config's model (RepVGG-A0 with
   the CIFAR stem: stride 1 in the stem and stage 1) and for the demo's (the shallow A0
   with standard strides): the first step (compilation) and the steps after it, images/s.

The time to the first log line of a run is about compile + ``log_every`` steps at the
step rate (statistics and scan before them).

  python benchmarks/folder_run.py [--per-class 200] [--steps 10]
  python benchmarks/folder_run.py --quick   # tiny, a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common as bc  # noqa: E402

IDX_DIR = "/usr/share/datasets/fashion-mnist"


def write_folder(out: str, idx_dir: str, per_class: int) -> int:
  """``per_class`` train and ``per_class // 4`` val PNGs of each Fashion-MNIST class."""
  from PIL import Image
  from repvgg_jax.data.sources import read_idx
  n = 0
  for split, prefix, count in (("train", "train", per_class), ("val", "t10k", per_class // 4)):
    images = read_idx(os.path.join(idx_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(idx_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    for c in range(10):
      d = os.path.join(out, split, f"class_{c}")
      os.makedirs(d, exist_ok=True)
      for i, j in enumerate(np.flatnonzero(labels == c)[:max(count, 1)]):
        Image.fromarray(images[j]).save(os.path.join(d, f"{i:05d}.png"))
        n += 1
  return n


def step_rates(cfg, batches: list[dict], steps: int) -> dict:
  """First step (compile) seconds and images/s of the next ``steps`` train steps."""
  import jax
  from repvgg_jax.train import sharding, steps as steps_lib
  from repvgg_jax.train.state import build_model, create_train_state, init_variables
  mesh = sharding.make_mesh()
  model = build_model(cfg.model, 10, deploy=False)
  state = sharding.replicate(create_train_state(
      model, init_variables(model, batches[0]["image"].shape[1:], 0), cfg.fp), mesh)
  train_step = steps_lib.make_train_step(mesh, 10, pixel_stats=((0.5,) * 3, (0.25,) * 3))
  t = time.perf_counter()
  state, m = train_step(state, sharding.shard_batch(batches[0], mesh))
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(steps):
    state, m = train_step(state, sharding.shard_batch(batches[1 + i % (len(batches) - 1)], mesh))
  jax.block_until_ready(m)
  dt = time.perf_counter() - t
  return {"first_step_s": first, "images_per_s": steps * len(batches[0]["image"]) / dt}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--per-class", type=int, default=200, help="training PNGs per class")
  p.add_argument("--steps", type=int, default=10, help="timed train steps per model")
  p.add_argument("--batches", type=int, default=20, help="timed loader batches")
  p.add_argument("--idx-dir", default=IDX_DIR)
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.per_class, args.steps, args.batches = 8, 2, 2
  from configs import demo, folder
  from repvgg_jax import data
  root = tempfile.mkdtemp(prefix="folder_run_")
  t = time.perf_counter()
  n = write_folder(os.path.join(root, "data"), args.idx_dir, args.per_class)
  write_s = time.perf_counter() - t

  cfg = folder.get_config()
  with cfg.unlocked():
    cfg.data.data_dir = os.path.join(root, "data")
    if args.quick:
      cfg.fp.batch_size = 8
  batch = cfg.fp.batch_size
  t = time.perf_counter()
  loader = data.make_loader(cfg.data, "train", global_batch_size=batch, train=True,
                            cache_dir=os.path.join(root, "workdir"))
  start_s = time.perf_counter() - t
  it = iter(loader)
  batches = [next(it)]  # the first batch starts the read threads
  t = time.perf_counter()
  batches += [next(it) for _ in range(args.batches)]
  loader_rate = args.batches * batch / (time.perf_counter() - t)

  demo_cfg = demo.get_config()
  rates = {"folder.py: RepVGG-A0, CIFAR stem (2, 4, 14, 1 blocks)": step_rates(
               cfg, batches, args.steps),
           "demo.py: shallow A0 (1, 2, 4, 1 blocks), standard strides": step_rates(
               demo_cfg, batches, args.steps)}
  folder_rate = next(iter(rates.values()))
  first_log = folder_rate["first_step_s"] + cfg.log_every * batch / folder_rate["images_per_s"]

  print(bc.header("Where a configs/folder.py run spends its time",
                  notes=(f"{n} Fashion-MNIST PNGs (28 px gray) written in {write_s:.1f} s; "
                         f"batch {batch}, 32 px, pad_crop_flip",)))
  print("\n| phase | seconds | images/s |")
  print("|---|---:|---:|")
  print(f"| loader start: file scan + normalization statistics | {start_s:.1f} | |")
  print(f"| loader alone ({args.batches} batches) | | {loader_rate:.0f} |")
  for name, r in rates.items():
    print(f"| train step, {name}: first step (compile) / after it | "
          f"{r['first_step_s']:.1f} | {r['images_per_s']:.1f} |")
  print(f"\nfolder.py's first log line (log_every={cfg.log_every}) comes about "
        f"{first_log:.0f} s after the loader started: compile + {cfg.log_every} steps. "
        f"Loader / step rate: {loader_rate / folder_rate['images_per_s']:.0f}x.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"images": n, "loader_start_s": start_s, "loader_images_per_s": loader_rate,
                 "steps": rates, "first_log_s": first_log, "nproc": bc.nproc(),
                 "cpu": bc.cpu_model()}, f, indent=1)


if __name__ == "__main__":
  main()

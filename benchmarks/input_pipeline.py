"""Input pipeline speed: ImageNet-size JPEG -> random-resized-crop + flip at 224 px, uint8.

Records: synthetic ImageNet-like JPEGs (``repvgg_jax.data.local_tfds.photo_jpeg``:
about 500 x 375 px, ~100 KB, quality 90), written as a tfds ``imagenet2012``
ArrayRecord dataset and read back through ``tfds.data_source``, as a real run
reads ImageNet.

1. One core, one thread, records already read: the per-record transform
   (``_Preprocess`` of ``data/pipeline.py``), full JPEG decode
   (``augment_image`` on the decoded pixels) vs reduced-size decode
   (``decode_augment``: PIL ``draft`` at 1/2, 1/4, 1/8 when the crop allows).
   images/s per core, and the cores one accelerator at 6,000 images/s needs.
2. The whole loader (``make_loader``: ArrayRecord reads, shuffle, transform,
   batching) with ``worker_count`` 0 (in-process threads) and > 0 (grain
   worker processes), images/s over all the cores it used.

  python benchmarks/input_pipeline.py [--records 512] [--workers 0,2] [--batches 20]
  python benchmarks/input_pipeline.py --quick   # tiny, a smoke test, not a measurement
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
from repvgg_jax.data import local_tfds, transforms  # noqa: E402
from repvgg_jax.data.pipeline import _Preprocess  # noqa: E402

TARGET = 6000  # images/s of one accelerator (the A0 training goal)


def _per_core(records: list[bytes], size: int, reps: int) -> dict:
  """images/s of one thread on the records: full decode vs reduced (draft) decode."""
  def full(encoded: bytes, rng):
    import io
    from PIL import Image
    pixels = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    return transforms.augment_image(pixels, "rrc_flip", size, True, rng)

  reduced = _Preprocess("rrc_flip", size, True)
  fns = {"full decode": full,
         "reduced decode (draft)": lambda e, rng: reduced({"image": e, "label": 0}, rng)}
  out = {}
  for name, fn in fns.items():
    times = []
    for r in range(reps):
      rng = np.random.default_rng(r)
      t = time.perf_counter()
      for e in records:
        fn(e, rng)
      times.append(time.perf_counter() - t)
    out[name] = len(records) / float(np.median(times))
  return out


def _loader_rate(data_dir: str, size: int, workers: int, batch: int, batches: int) -> float:
  import types
  from repvgg_jax import data
  cfg = types.SimpleNamespace(source="tfds", name="imagenet2012", data_dir=data_dir,
                              image_size=size, augment="rrc_flip", worker_count=workers)
  it = iter(data.make_loader(cfg, "train", global_batch_size=batch, train=True,
                             process_index=0, process_count=1))
  for _ in range(2):  # start-up: workers, first reads
    b = next(it)
  assert b["image"].dtype == np.uint8 and b["image"].shape == (batch, size, size, 3)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--records", type=int, default=512)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--workers", default="0,2", help="comma-separated worker_count values")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--data-dir", default="", help="where to write the records (default: a temp dir)")
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.records, args.reps, args.batch, args.batches, args.size = 16, 1, 4, 2, 64
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="input_pipeline_")
  t = time.time()
  local_tfds.ensure_local_imagenet(data_dir, train=args.records, validation=16)
  import tensorflow_datasets as tfds
  source = tfds.data_source("imagenet2012", split="train", data_dir=data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  records = [source[i]["image"] for i in range(len(source))]
  write_s = time.time() - t
  kb = np.mean([len(r) for r in records]) / 1e3

  per_core = _per_core(records, args.size, args.reps)
  loader = {int(w): _loader_rate(data_dir, args.size, int(w), args.batch, args.batches)
            for w in args.workers.split(",")}
  best = per_core["reduced decode (draft)"]
  print(bc.header("Input pipeline: JPEG decode + random-resized-crop + flip, uint8 out",
                  notes=(f"{len(records)} synthetic ImageNet-like JPEG records, mean "
                         f"{kb:.1f} KB, written and read in {write_s:.1f} s",)))
  print(f"\n### One core (one thread), {args.size} px, median of {args.reps} passes\n")
  print("| decode | images/s per core | cores for 6,000 images/s |")
  print("|---|---:|---:|")
  for name, rate in per_core.items():
    print(f"| {name} | {rate:.0f} | {TARGET / rate:.1f} |")
  print(f"\nreduced / full: {best / per_core['full decode']:.2f}x")
  print(f"\n### Whole loader (make_loader, tfds ArrayRecord), batch {args.batch}, "
        f"{args.batches} batches, {bc.nproc()} CPUs\n")
  print("| worker_count | images/s (all cores used) |")
  print("|---:|---:|")
  for w, rate in loader.items():
    print(f"| {w} | {rate:.0f} |")
  result = {"records": len(records), "mean_kb": kb, "size": args.size,
            "per_core": per_core, "cores_for_6000": {k: TARGET / v for k, v in per_core.items()},
            "loader": {str(k): v for k, v in loader.items()}, "nproc": bc.nproc(),
            "cpu": bc.cpu_model()}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

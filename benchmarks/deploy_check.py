"""The deployment files of a trained run, each run by its own runtime on the test split.

  python launch/main.py --config configs/demo.py --workdir runs/demo
  python benchmarks/deploy_check.py --workdir runs/demo

Reads ``<workdir>/model.packed``, ``model.onnx`` and ``model.stablehlo`` as the
trainer wrote them (nothing re-exported) and runs the test split (the data section
of ``--config``, default ``configs/demo.py``) through:

- ``repvgg_jax.load_packed`` (the reference) and ``DeployedModel.integer`` where the
  model allows it (int8-grid kernels, 8-bit activations, no SE);
- ONNX Runtime (CPU) on ``model.onnx``, when onnxruntime is installed;
- IREE on ``model.stablehlo``: its module compiled as it is by iree-base-compiler for
  llvm-cpu (host CPU) and run by iree-base-runtime, in calls of the file's static
  batch (``export.stablehlo_batch``; a symbolic batch is reported as not compiled).

Prints one Markdown table: accuracy, and the share of test images on which each
runtime predicts as ``load_packed`` and as the integer forward.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.* and benchmarks.* import as modules.

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_common  # noqa: E402
from repvgg_jax.train import export  # noqa: E402


def _test_split(config: str):
  from repvgg_jax import data
  module = importlib.import_module(config.removesuffix(".py").replace("/", "."))
  loader = data.make_loader(module.get_config().data, "test", global_batch_size=500,
                            train=False)
  images, labels = [], []
  for b in loader:
    mask = np.asarray(b["mask"])
    images.append(np.asarray(b["image"])[mask])
    labels.append(np.asarray(b["label"])[mask])
  return np.concatenate(images), np.concatenate(labels)


def _predictions(fn, images, batch=500):
  return export.in_batches_of(fn, batch)(images).argmax(-1)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default="configs/demo.py")
  args = ap.parse_args()
  import repvgg_jax
  images, labels = _test_split(args.config)
  path = lambda name: os.path.join(args.workdir, name)  # noqa: E731
  deployed = repvgg_jax.load_packed(path("model.packed"))
  preds, notes = {"load_packed": _predictions(deployed, images)}, []
  try:
    preds["integer forward"] = _predictions(deployed.integer, images)
  except ValueError as e:
    notes.append(f"integer forward: {e}")
  if os.path.exists(path("model.onnx")):
    try:
      with open(path("model.onnx"), "rb") as f:
        ort = export.onnx_runtime_fn(f.read())
    except ImportError:
      notes.append("model.onnx: onnxruntime not installed")
    else:
      preds["ONNX Runtime (model.onnx)"] = _predictions(ort, images)
  else:
    notes.append("model.onnx: not in the workdir")
  with open(path("model.stablehlo"), "rb") as f:
    exported = jax.export.deserialize(f.read())
  batch = exported.in_avals[0].shape[0]
  fn = bench_common.iree_fn(exported) if isinstance(batch, int) else None
  if not isinstance(batch, int):
    notes.append(f"IREE: symbolic batch {batch}: set export.stablehlo_batch")
  elif fn is None:
    notes.append("IREE: iree-base-compiler / iree-base-runtime not installed")
  else:
    preds[f"IREE llvm-cpu (model.stablehlo, batch {batch})"] = _predictions(fn, images, batch)

  print(bench_common.header(f"Deployment files of {os.path.basename(os.path.normpath(args.workdir))}"
                            f" in their runtimes, {len(images):,} test images"))
  ref = preds["load_packed"]
  integer = preds.get("integer forward")
  print("| runtime | accuracy | same prediction as load_packed | as the integer forward |")
  print("|---|---:|---:|---:|")
  for name, p in preds.items():
    same_int = "-" if integer is None else f"{int((p == integer).sum()):,}"
    print(f"| {name} | {100 * (p == labels).mean():.2f}% | {int((p == ref).sum()):,} | "
          f"{same_int} |")
  for n in notes:
    print(f"\n{n}")


if __name__ == "__main__":
  main()

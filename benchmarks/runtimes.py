"""Inference throughput of one W4A8 model in every runtime it deploys to, side by side,
against ONNX Runtime's own ``quantize_static`` W8A8 and the float network.

Two networks, each with random merged weights (speed depends on shapes and kernels,
not on training): the demo's (shallow RepVGG-A0, 1, 2, 4, 1 blocks, 32 px, 10 classes)
and RepVGG-A0 (2, 4, 14, 1 blocks, 224 px, ImageNet stem, 1000 classes). Ours: 4-bit
ClusterQAT codebooks (stem and head at 8 bits), 8-bit activations calibrated on random
images, as int8-grid codebooks (``int8_levels=True``) and as plain codebooks. The float
network: the same merged params, no kernel quantized, float activations. Each at batch
1 and 32; the rows of one (network, batch) are timed interleaved in one process
(``bench_common.time_interleaved``), each runtime on ``--threads``:

- JAX ``load_packed`` of the int8-grid model (float convs of the kernels decoded at
  load, fake-quantized activations) and its ``.integer`` forward (int8 x int8 -> int32)
- ONNX Runtime, each of four ONNX files: ours int8 grid (``export_onnx(...,
  integer=True)``: ``QLinearConv``, ``QGemm``), ours codebook ``model.onnx`` (``Gather``
  decode, float convs), ``quantize_static`` (ONNX Runtime's W8A8 of the float network's
  export: QDQ, per-channel, QUInt8 activations, QInt8 weights, min-max on random
  images; the stock baseline, ``bench_common.quantize_static_onnx``) and the float
  network's float32 export (no QDQ)
- OpenVINO (CPU plugin, ``INFERENCE_PRECISION_HINT`` f32: without it the plugin runs
  float ops in bf16 on CPUs with AMX) on each of the same four files
- IREE (llvm-cpu) running ``export_stablehlo(batch_size=B)`` of the int8-grid model with
  the fast flags: ``--iree-llvmcpu-target-cpu=host`` and ``bench_common.IREE_FOLD_DECODE``
  (the codebook decode folded at compile)
- PyTorch fp32 eager: the float network as ``nn.Conv2d`` + ReLU layers, pool, linear

A runtime that is not installed is skipped with one line. Before timing, every row runs
the timed batch once and is compared with its JAX reference (last column): the int8-grid
rows with the integer forward (IREE: ``load_packed``), the codebook rows with the
codebook model's ``load_packed``, the float rows with the float network's; a row whose
logits differ by more than ``CHECK_TOL`` of the reference's range stops the script.
``quantize_static`` is another quantization of the float network: its rows are compared
with the float network and printed, not checked. After each table, the two goals of our
int8 ONNX against ``quantize_static``'s file (>= 1.0x in ONNX Runtime, level in OpenVINO).

JAX's thread count is XLA's (all cores of the process's CPU set): run the script under
``taskset -c 0-<threads-1>`` so that every runtime sees the same cores.

  taskset -c 0,1 python benchmarks/runtimes.py [--threads 2] [--batches 1,32] [--nets demo,a0]
  taskset -c 0 python benchmarks/runtimes.py --smoke  # demo, batch 1, 1 repeat, 1 thread
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Callable

import jax
import numpy as np

import bench_common as bc
import repvgg_jax as rv

# Same-network rows: largest |logit - reference| over the reference's logit range.
CHECK_TOL = 0.05
JAX_ROW, ORT_FLOAT = "JAX load_packed (float convs)", "ONNX Runtime, float32 network"
OURS, THEIRS = "ours int8 grid", "quantize_static W8A8"
# ONNX file (its rows' label) -> the JAX reference its rows are compared with, in row order.
FILES = {OURS: "integer", "ours codebook model.onnx": "codebook",
         THEIRS: "float (loose)", "float32 network": "float"}


def _installed(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def runtimes() -> dict[str, bool]:
  """Which optional runtimes import here; one line for each one that does not."""
  have = {"onnx": _installed("onnx"), "onnxruntime": _installed("onnxruntime"),
          "openvino": _installed("openvino"), "iree": _installed("iree.runtime")
          and _installed("iree.compiler"), "torch": _installed("torch")}
  skips = {"onnxruntime": "ONNX Runtime rows (and the quantize_static file)",
           "openvino": "OpenVINO rows", "iree": "IREE row", "torch": "PyTorch row"}
  if not have["onnx"]:
    print("ONNX Runtime and OpenVINO rows skipped: the onnx package is not installed")
  for k, rows in skips.items():
    if not have[k] and (have["onnx"] or k in ("iree", "torch")):
      print(f"{rows} skipped: {k} is not installed")
  return have


def versions(have: dict[str, bool]) -> str:
  out = []
  for name, dist in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"),
                     ("iree", "iree-base-runtime"), ("torch", "torch")):
    out.append(f"{dist} {bc._dist_version(dist)}" if have[name] else f"{dist}: not installed")
  return "runtimes: " + ", ".join(out)


def torch_fn(packed: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
  """``f(uint8 NHWC images) -> logits``: PyTorch fp32 eager of a packed model with float
  activations (``act_bits=0``), its layers as plain ``torch.nn`` modules (Conv2d + ReLU
  per block, average pool, Linear) holding the decoded float32 kernels, NCHW."""
  import torch
  from torch import nn
  graph = rv.deploy.deploy_graph(packed)
  if graph.act_bits:
    raise ValueError("torch_fn: a float-activation model (act_bits=0) only")
  mods: list = []
  with torch.no_grad():
    for layer in graph.layers:
      if layer.se is not None:
        raise ValueError(f"torch_fn: {layer.name} has squeeze-excite, not built here")
      k = np.asarray(graph.kernel(layer), np.float32)
      bias = torch.from_numpy(np.array(layer.bias, np.float32))  # a writable copy
      if layer.kind == "conv":
        kh, kw, cin_g, cout = k.shape
        m = nn.Conv2d(cin_g * layer.groups, cout, (kh, kw), layer.strides, layer.padding,
                      groups=layer.groups)
        m.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))))
      else:
        if layer.pool:
          mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        m = nn.Linear(*k.shape)
        m.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.T)))
      m.bias.copy_(bias)
      mods += [m, nn.ReLU()] if layer.relu else [m]
  net = nn.Sequential(*mods).eval()
  mean, std = (torch.tensor(v, dtype=torch.float32).reshape(1, 3, 1, 1)
               for v in (graph.mean, graph.std))
  torch.set_num_threads(threads)

  def run(images):
    with torch.inference_mode():
      x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float()
      if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
      return net((x * (1 / 255) - mean) / std).numpy()
  return run


def _ort_fn(model: bytes, threads: int) -> Callable[[np.ndarray], np.ndarray]:
  session = bc.ort_session(model, threads)
  return lambda images: session.run(["logits"], {"images": images})[0]


def _check(out: np.ndarray, ref: np.ndarray) -> tuple[str, float]:
  y, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  diff = float(np.abs(y - r).max() / max(float(r.max() - r.min()), 1e-12))
  same = int((y.argmax(-1) == r.argmax(-1)).sum())
  return f"argmax {same}/{len(r)}, logits {diff:.0e}", diff


def _table(net: str, batch: int, args, have: dict[str, bool]) -> tuple[str, list[str], dict]:
  title, _, size, _ = bc.NETS[net]
  grid, codebook, float_net = (bc.packed_model(net, 8, "int8_grid"),
                               bc.packed_model(net, 8, "codebook"),
                               bc.packed_model(net, 0, "float"))
  images = np.random.default_rng(2).integers(0, 256, (batch, size, size, 3), np.uint8)
  deployed = rv.DeployedModel(grid)
  refs = {"integer": deployed.integer(images), "load_packed": deployed(images),
          "codebook": rv.DeployedModel(codebook)(images),
          "float": rv.DeployedModel(float_net)(images)}
  refs["float (loose)"] = refs["float"]
  # label -> (f(images) -> logits, JAX reference name or None)
  rows: dict[str, tuple[Callable, str | None]] = {
      JAX_ROW: (lambda x: jax.block_until_ready(deployed(x)), None),
      "JAX integer (int8 convs)": (lambda x: jax.block_until_ready(deployed.integer(x)), None)}
  files = {}
  if have["onnx"]:
    files[OURS] = rv.export_onnx(grid, integer=True).SerializeToString()
    files["ours codebook model.onnx"] = rv.export_onnx(codebook).SerializeToString()
    files["float32 network"] = rv.export_onnx(float_net).SerializeToString()
    if have["onnxruntime"]:
      files[THEIRS] = bc.quantize_static_onnx(files["float32 network"],
                                              bc.calibration_images(net, batches=2))
    files = {k: files[k] for k in FILES if k in files}
  if have["onnxruntime"]:
    for k, model in files.items():
      rows[f"ONNX Runtime, {k}"] = (_ort_fn(model, args.threads), FILES[k])
  if have["openvino"]:
    from repvgg_jax.deploy import openvino
    for k, model in files.items():
      rows[f"OpenVINO (f32 hint), {k}"] = (
          openvino.onnx_fn(model, precision="f32", threads=args.threads), FILES[k])
  if have["iree"]:
    exported = jax.export.deserialize(rv.export_stablehlo(grid, batch_size=batch))
    rows["IREE llvm-cpu host, decode folded at compile"] = (
        bc.iree_fn(exported, args.threads, fold_decode=True), "load_packed")
  if have["torch"]:
    rows["PyTorch fp32 eager, float32 network"] = (torch_fn(float_net, args.threads), "float")

  checks, bad = {}, []
  for k, (f, ref) in rows.items():
    if ref is not None:
      checks[k], diff = _check(f(images), refs[ref])
      checks[k] = f"{ref}: {checks[k]}"
      if diff > CHECK_TOL and ref != "float (loose)":
        bad.append(f"{k}: {checks[k]}")
  t = bc.time_interleaved({k: (lambda f=f: f(images)) for k, (f, _) in rows.items()},
                          args.repeats, min_sample_s=args.min_sample_s)
  ort_float = t.get(ORT_FLOAT, {}).get("ms")
  out = [f"## {title}, batch {batch}", "",
         "| runtime | ms per batch | images/s | vs JAX load_packed | vs ONNX Runtime float32 "
         "| against JAX (reference: argmax agreement, max logit diff / range) |",
         "|---|---:|---:|---:|---:|---|"]
  for k, r in t.items():
    out.append(f"| {k} | {bc.fmt_ms(r)} | {batch / r['ms'] * 1e3:,.0f} | "
               f"{bc.ratio(t[JAX_ROW]['ms'], r['ms'])} | {bc.ratio(ort_float, r['ms'])} | "
               f"{checks.get(k, 'reference')} |")
  goals = {}
  for rt in ("ONNX Runtime", "OpenVINO (f32 hint)"):
    ours, theirs = t.get(f"{rt}, {OURS}"), t.get(f"{rt}, {THEIRS}")
    if ours and theirs:
      goals[rt.split(" (")[0]] = theirs["ms"] / ours["ms"]
  out += [""] + [f"ours int8 ONNX vs quantize_static in {rt}: {g:.2f}x" for rt, g in
                 goals.items()]
  return "\n".join(out) + "\n", bad, goals


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--nets", default="demo,a0", help=f"of {sorted(bc.NETS)}")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--min-sample-s", type=float, default=0.5,
                  help="each timed sample repeats the call for at least this long")
  ap.add_argument("--smoke", action="store_true",
                  help="a quick check that every row runs: --nets demo --batches 1 "
                       "--repeats 1 --threads 1 --min-sample-s 0.05")
  args = ap.parse_args()
  if args.smoke:
    args.nets, args.batches, args.repeats, args.threads, args.min_sample_s = (
        "demo", "1", 1, 1, 0.05)
  have = runtimes()
  print(bc.header("Deployed W4A8 inference in every runtime, against quantize_static", notes=(
      versions(have),
      f"threads per runtime: {args.threads} (ONNX Runtime intra-op, OpenVINO "
      "INFERENCE_NUM_THREADS, IREE task topology groups, torch set_num_threads, JAX: the "
      "CPU set)", f"repeats {args.repeats}; ms per batch: median (min-max) "
      "over repeats; ratios: the other row's ms over this row's (> 1: this row is faster)",
      "goals: ours int8 ONNX vs quantize_static (its ms over ours) >= 1.0x in ONNX Runtime, "
      "about 1.0x in OpenVINO")))
  bad, summary = [], []
  for net in args.nets.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      table, wrong, goals = _table(net, batch, args, have)
      print(table, flush=True)
      bad += [f"{net} batch {batch}, {b}" for b in wrong]
      summary += [f"| {net} | {batch} | " + " | ".join(
          f"{goals[rt]:.2f}x" if rt in goals else "n/a" for rt in ("ONNX Runtime", "OpenVINO"))
          + " |"]
  print("## Goals: ours int8 ONNX vs quantize_static (> 1: ours faster)\n\n"
        "| network | batch | in ONNX Runtime (goal >= 1.0x) | in OpenVINO (goal ~1.0x) |\n"
        "|---|---:|---:|---:|\n" + "\n".join(summary) + "\n")
  if bad:
    raise SystemExit("rows that do not compute their JAX reference's network "
                     f"(logits off by more than {CHECK_TOL} of the range):\n  " +
                     "\n  ".join(bad))


if __name__ == "__main__":
  main()

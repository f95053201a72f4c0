"""Stock quantization tools on our merged float network, beside our stock PTQ and ClusterQAT.

  python -m experiments.stock_tools --workdir runs/stock_tools \\
      --fp_workdirs runs/demo_seeds/seed0,runs/demo_seeds/seed1,runs/demo_seeds/seed2
  python -m experiments.stock_tools --workdir runs/stock_tools --report_only
  python -m experiments.stock_tools --workdir /tmp/stock_smoke --smoke

What a user who takes the merged float network to a third-party tool gets, against what
this repository gives. Each ``--fp_workdirs`` entry is a finished trainer workdir (the
demo's ``experiments.demo_seeds`` runs; the full-depth FP rows of ``experiments.study``
or ``experiments.qat_length``, ``<workdir>/fp_bn_s0`` and so on): its ``report.json``'s
config gives the model and data, ``checkpoints/fp`` the FP variables, which are merged
(one 3x3 conv a block) as the trainer merges them. On that float network, every row
evaluated on the full test split of the run's own data:

* ``float``: the merged float network (JAX).
* ``ort_qint8``, ``ort_qint4``: ONNX Runtime's ``quantize_static`` of the float ONNX export
  (``export_onnx`` of the float packed model; ``benchmarks/bench_common.quantize_static_onnx``):
  QDQ, per-channel weights (QInt8 / QInt4), QUInt8 activations, min-max calibration on
  the first ``--calib_images`` training images (unaugmented, in order). At QInt4 the stem
  and the head stay QInt8 (``TensorQuantOverrides``), as our rows keep them at 8 bits.
  Run by ONNX Runtime's CPU provider.
* ``coreml_w4`` / ``w3`` / ``w2``: coremltools' k-means palettizer
  (``OpPalettizerConfig(mode="kmeans", granularity="per_grouped_channel", group_size=1)``:
  one LUT per output channel; stem and head at 8 bits) on the ML program of the float
  network (``export_coreml`` of the float packed model). Core ML predicts only on Apple
  platforms, so every ``constexpr_lut_to_dense`` op's LUT and indices are read back from
  the palettized program, decoded in NumPy (checked against coremltools' own
  decompression: equal, at most 2^b values per channel) and put into our deploy network,
  float activations as Core ML runs a weight-only palettized model (JAX).
* ``ptq_w{8,4,3,2}a8``: our stock PTQ (``repvgg_jax.train.qat.stock_baseline``: uniform
  per-channel weights, MSE step, stem and head at 8 bits) with 8-bit activations
  calibrated by MSE on the trainer's calibration batches, as the report's ``ptq`` row.
* ``ptq_w{4,3,2}``: the same weights with float activations (weight-only, as the
  palettizer's rows).
* ``kmeans_w{4,3,2}``: our per-channel k-means fit (ClusterQAT's starting codebooks,
  before any QAT), float activations: the palettizer's method in our implementation.

ClusterQAT itself is not run: its accuracy is read from the run's ``report.json`` (the
demo's W2A8 ``qat`` and ``packed`` forms), or for an FP row of ``experiments.qat_length``
(``fp_<regime>_s<seed>``) from that study's ledger (``--qat_ledger``: per bits the longest
QAT, distilled where it ran).

Each finished row goes at once into the ledger ``experiments/results/stock_tools_rows.json``
(atomically; a row the ledger has is not run again), from which
``experiments/results/stock_tools.md`` is written alone (mean ± std over the seeds of one
network). Pin a run to one core (``taskset -c 0``).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.*, experiments.*, benchmarks.* import however it is started

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import ledger as study_ledger  # noqa: E402
from experiments import rows as sr  # noqa: E402
from repvgg_jax.fileio import atomic_write_text  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
NAME = "stock_tools"
CALIB_IMAGES = 512
# name -> (tool, weight bits, activation bits or None); the order rows run and print in.
METHODS = {
    "float": ("float", None, None),
    "ort_qint8": ("ort", 8, 8), "ort_qint4": ("ort", 4, 8),
    **{f"coreml_w{b}": ("coreml", b, None) for b in (4, 3, 2)},
    **{f"ptq_w{b}a8": ("ptq", b, 8) for b in (8, 4, 3, 2)},
    **{f"ptq_w{b}": ("ptq", b, None) for b in (4, 3, 2)},
    **{f"kmeans_w{b}": ("kmeans", b, None) for b in (4, 3, 2)},
}
SMOKE_METHODS = ("float", "ort_qint8", "ort_qint4", "coreml_w2", "ptq_w2", "kmeans_w2")
BITS = (8, 4, 3, 2)
# The page's rows: (tool, activation bits) -> title.
TITLES = {
    ("ort", 8): "ONNX Runtime `quantize_static` (QDQ, per-channel min-max weights, QUInt8 "
                "min-max activations)",
    ("coreml", None): "coremltools k-means palettizer (per-channel LUT), weight-only",
    ("ptq", 8): "ours: stock PTQ (uniform per-channel, MSE step), 8-bit MSE activations",
    ("ptq", None): "ours: stock PTQ (uniform per-channel, MSE step), weight-only",
    ("kmeans", None): "ours: per-channel k-means fit, no QAT (ClusterQAT's start), weight-only",
    ("qat", 8): "ours: ClusterQAT, fake-quant (the run's report)",
    ("packed", 8): "ours: ClusterQAT, packed file (the run's report)",
}

_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (exported and quantized "
                               "files, the compilation cache); with --smoke also the tiny "
                               "FP run, the ledger and the page.")
_FP_WORKDIRS = flags.DEFINE_list("fp_workdirs", [], "Finished trainer workdirs (report.json "
                                 "and checkpoints/fp), one a seed.")
_CALIB = flags.DEFINE_integer("calib_images", CALIB_IMAGES, "quantize_static's calibration "
                              "images (the first of the training split).")
_ONLY = flags.DEFINE_string("only", "", "Run only the methods whose name matches this regex.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0.0, "Start no row after this many minutes "
                                  "(0 = no limit).")
_QAT_LEDGER = flags.DEFINE_string("qat_ledger", os.path.join(RESULTS, "qat_length_rows.json"),
                                  "experiments.qat_length's ledger: ClusterQAT of its FP rows.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write the page from the ledger.")
_RESULTS = flags.DEFINE_string("results", RESULTS, "Directory of the ledger and page.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny FP run of configs/tiny.py and a few "
                           "methods on it (checks the script); ledger and page go into the "
                           "workdir.")
flags.mark_flags_as_required(["workdir"])


# -- a run: the FP workdir's config, data and merged network ------------------------------

class Run:
  """One FP workdir: its config, test batches, loaders and merged float variables."""

  def __init__(self, fp_workdir: str, scratch: str):
    import jax
    import ml_collections
    import repvgg_jax as rv
    from repvgg_jax.train import sharding
    from repvgg_jax.train.checkpoint import load_variables
    from repvgg_jax.train.state import build_model, init_variables
    from repvgg_jax.train.workdir import checkpoint_dir
    self.workdir = fp_workdir
    self.report = sr.read_json(os.path.join(fp_workdir, "report.json"))
    if self.report is None:
      raise FileNotFoundError(f"{fp_workdir}: no report.json (not a finished trainer run)")
    cfg = ml_collections.ConfigDict(self.report["config"])
    if cfg.data.local_examples:
      raise ValueError(f"{fp_workdir}: a local-mode run (data.local_examples) is not supported")
    self.cfg = cfg
    # The loaders' statistics cache is ours, never the FP workdir (read only here).
    self.cache = os.path.join(scratch, "data")
    os.makedirs(self.cache, exist_ok=True)
    stats = os.path.join(fp_workdir, "data_stats.json")
    if os.path.exists(stats) and not os.path.exists(os.path.join(self.cache, "data_stats.json")):
      shutil.copy(stats, self.cache)
    test = self.loader("test", cfg.eval_batch_size, False)
    self.batches = list(test)
    self.num_classes, self.image_shape = test.num_classes, test.image_shape
    self.pixel_stats, self.mean, self.std = test.pixel_stats, test.mean, test.std
    model = build_model(cfg.model, self.num_classes, deploy=False)
    variables = load_variables(checkpoint_dir(fp_workdir, "fp"),
                               init_variables(model, self.image_shape, cfg.seed))
    self.merged = jax.device_get(rv.merge(variables))
    self.deploy = build_model(cfg.model, self.num_classes, deploy=True)
    self.mesh = sharding.make_mesh()
    # Every kernel skipped by the quantizer: the float merged network as a packed model.
    q = rv.make_quantizer("cluster", bits=4, skip=("reparam_conv", "head"))
    self.float_packed = rv.pack(self.merged["params"], q, q.init(self.merged["params"]),
                                rv.model_description(self.deploy, image_size=self.image_shape[0],
                                                     mean=self.mean, std=self.std))

  def loader(self, split: str, batch: int, train: bool):
    from repvgg_jax import data
    return data.make_loader(self.cfg.data, split, global_batch_size=batch, train=train,
                            seed=self.cfg.seed, cache_dir=self.cache)

  def calibration(self, n: int) -> list[np.ndarray]:
    """The first ``n`` training images (fewer if the split is smaller), unaugmented, in
    order, in batches of the QAT batch size: the first of the trainer's calibration batches."""
    out, count = [], 0
    for b in self.loader("train", self.cfg.qat.batch_size, False):
      keep = np.asarray(b["image"])[np.asarray(b["mask"]).astype(bool)][:n - count]
      out.append(keep)
      count += len(keep)
      if count >= n:
        break
    return out

  def evaluate_params(self, params: dict) -> float:
    """Top-1 of the float deploy network with ``params`` (JAX, the trainer's eval step)."""
    from repvgg_jax.train import sharding, steps
    from repvgg_jax.train.state import create_train_state
    state = sharding.replicate(create_train_state(self.deploy, {**self.merged, "params": params},
                                                  self.cfg.qat), self.mesh)
    step = steps.make_eval_step(self.mesh, pixel_stats=self.pixel_stats)
    return steps.evaluate(step, state, self.batches, self.mesh)

  def evaluate_fn(self, fn) -> float:
    """Top-1 of ``fn(uint8 images) -> logits`` (ONNX Runtime)."""
    from repvgg_jax.train.export import evaluate_deployed
    return float(evaluate_deployed({"fn": fn}, self.batches)["fn"]["accuracy"])

  def evaluate_quantized(self, method: str, bits: int, act_bits: int | None) -> float:
    """Top-1 of our quantizer ``method`` ("uniform": the stock baseline's, "cluster": the
    k-means fit) at ``bits`` on the merged network, untrained, as the report's ``ptq`` row
    is evaluated (activation steps by MSE on the trainer's calibration batches)."""
    from repvgg_jax.train import qat, sharding, steps
    qc = qat.stock_baseline(self.cfg.quant)
    qc.update(method=method, bits=bits, act_bits=act_bits or 0, act_calibration="mse")
    q, _, state = qat.initial_state(self.cfg, self.merged, self.num_classes, self.loader,
                                    None, qc)
    step = steps.make_eval_step(self.mesh, q, pixel_stats=self.pixel_stats)
    return steps.evaluate(step, sharding.replicate(state, self.mesh), self.batches, self.mesh)


def net_key(cfg) -> str:
  """A short name of the network and data a run trained (runs of one key average)."""
  blocks = "-".join(str(b) for b in cfg.model.blocks) or "full"
  norm = cfg.model.norm + (f"-{cfg.model.oabn_form}" if cfg.model.norm == "oabn" else "")
  return (f"{cfg.model.name}_{blocks}_{norm}_{_data_name(cfg)}{cfg.data.image_size}"
          f"_fp{cfg.fp.num_steps}")


def _data_name(cfg) -> str:
  return "synthetic" if cfg.data.source == "synthetic" else cfg.data.name


def net_title(cfg) -> str:
  blocks = ", ".join(str(b) for b in cfg.model.blocks) or "the variant's own"
  norm = {"bn": "BN", "oabn": f"OABN `{cfg.model.oabn_form}`"}.get(cfg.model.norm,
                                                                   cfg.model.norm)
  return (f"{cfg.model.name}, {blocks} blocks, {norm}; {_data_name(cfg)} at "
          f"{cfg.data.image_size} px, {cfg.fp.num_steps} FP steps")


def clusterqat_of(run: Run, qat_ledger: str) -> dict:
  """``{bits: {"qat", "packed", "act_bits", "source"}}``: the run's own QAT forms, else
  the qat_length ledger's rows of its regime and seed (longest QAT, distilled first)."""
  forms = run.report.get("forms", {})
  if "packed" in forms and "accuracy" in forms["packed"]:
    p = forms["packed"]
    return {str(p["weight_bits"]): {"qat": forms.get("qat", {}).get("accuracy"),
                                    "packed": p["accuracy"], "act_bits": p.get("act_bits"),
                                    "source": "report.json"}}
  m = re.fullmatch(r"fp_(.+)_s(\d+)", os.path.basename(os.path.normpath(run.workdir)))
  rows = (sr.read_json(qat_ledger) or {"rows": {}})["rows"]
  if m is None or not rows:
    return {}
  best = {}
  for name, r in rows.items():
    if (r.get("regime"), r.get("seed")) != (m.group(1), int(m.group(2))) or "bits" not in r:
      continue
    if r.get("forms", {}).get("packed") is None:
      continue
    rank = (r["steps"], r.get("distill") == "logits")
    if str(r["bits"]) not in best or rank > best[str(r["bits"])][0]:
      best[str(r["bits"])] = (rank, {"qat": r["forms"].get("qat"),
                                     "packed": r["forms"]["packed"], "act_bits": 8,
                                     "source": f"qat_length {name}"})
  return {b: v for b, (_, v) in best.items()}


# -- the tools --------------------------------------------------------------------------

def ort_row(run: Run, bits: int, calibration: list[np.ndarray]) -> tuple[float, dict]:
  """``quantize_static`` at QInt8 / QInt4 weights, run by ONNX Runtime."""
  import onnx
  from onnx import numpy_helper
  from onnxruntime import quantization as oq
  import repvgg_jax as rv
  from benchmarks import bench_common
  from repvgg_jax.deploy.graph import deploy_graph
  from repvgg_jax.train.export import onnx_runtime_fn
  layers = deploy_graph(run.float_packed).layers
  extra = None
  if bits == 4:  # stem and head at 8 bits, as ours
    extra = {"TensorQuantOverrides": {layers[i].kernel: [{"quant_type": oq.QuantType.QInt8,
                                                         "axis": 0}] for i in (0, -1)}}
  model = bench_common.quantize_static_onnx(
      rv.export_onnx(run.float_packed).SerializeToString(), calibration,
      weight_type=f"QInt{bits}", extra_options=extra)
  proto = onnx.load_from_string(model)
  kinds, levels, grid = {}, [], [0, 0]
  for init in proto.graph.initializer:
    if not init.name.endswith("_quantized") or not init.name.startswith(
        tuple(layer.kernel for layer in layers)):
      continue
    kinds[init.name[:-len("/kernel_quantized")]] = onnx.TensorProto.DataType.Name(init.data_type)
    if init.name.startswith(tuple(layer.kernel for layer in layers[1:-1])):
      w = numpy_helper.to_array(init).astype(np.int64)
      w = w.reshape(w.shape[0], -1)
      levels.append(max(len(np.unique(r)) for r in w))
      grid = [min(grid[0], int(w.min())), max(grid[1], int(w.max()))]
  domains = sorted({n.domain or "ai.onnx" for n in proto.graph.node
                    if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
  with tempfile.TemporaryDirectory() as tmp:
    opt = os.path.join(tmp, "optimized.onnx")
    bench_common.ort_session(model, 1, opt)
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
  acc = run.evaluate_fn(onnx_runtime_fn(model))
  return acc, {"kernel_types": kinds, "qdq_domains": domains,
               "block_levels_per_channel_max": max(levels), "block_int_range": grid,
               "optimized_ops": dict(sorted(ops.items())),
               "calib_images": int(sum(len(b) for b in calibration)), "size_bytes": len(model)}


def coreml_row(run: Run, bits: int, scratch: str) -> tuple[float, dict]:
  """coremltools' k-means palettizer; the LUTs decoded into our float deploy network."""
  import coremltools.optimize.coreml as cto
  from flax import traverse_util
  import repvgg_jax as rv
  from repvgg_jax.deploy.coreml import LAYOUTS
  from repvgg_jax.deploy.graph import deploy_graph
  first_last = int(run.cfg.quant.first_last_bits)
  layers = deploy_graph(run.float_packed).layers
  mlmodel = rv.export_coreml(run.float_packed, os.path.join(scratch, "float.mlpackage"),
                             channels=run.image_shape[-1])
  # The program's conv and linear ops in order, less squeeze-excite's: the graph's layers.
  convs = [op for op in mlmodel._mil_program.functions["main"].operations
           if op.op_type in ("conv", "linear") and not re.search(r"_se_(down|up)$", op.name)]
  shapes = [tuple(op.weight.shape) for op in convs]
  merged = traverse_util.flatten_dict(run.merged["params"], sep="/")  # kernel path -> array
  want = [tuple(np.shape(merged[layer.kernel])[i] for i in LAYOUTS[layer.kind])
          for layer in layers]
  if shapes != want:
    raise ValueError(f"the ML program's weights {shapes} are not the graph's {want}")
  configs = {}
  for i, (op, layer) in enumerate(zip(convs, layers)):
    b = first_last if i in (0, len(layers) - 1) else bits
    configs[op.weight.op.name] = cto.OpPalettizerConfig(
        mode="kmeans", nbits=b, granularity="per_grouped_channel", group_size=1,
        weight_threshold=0)
  palettized = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))
  ops = {op.name: op for op in palettized._mil_program.functions["main"].operations}
  params = dict(merged)
  check = {"levels_per_channel_max": {}, "rel_rms_error": {}, "max_abs_vs_coremltools": 0.0}
  for i, (op, layer) in enumerate(zip(convs, layers)):
    lut_op = ops[op.name].weight.op
    if lut_op.op_type != "constexpr_lut_to_dense":
      raise ValueError(f"{layer.kernel}: not palettized ({lut_op.op_type})")
    idx, lut = np.asarray(lut_op.indices.val), np.asarray(lut_op.lut.val, np.float64)
    dense = decode_lut(idx, lut)
    ref = np.asarray(lut_op.materialized_val_inference(), np.float64)
    check["max_abs_vs_coremltools"] = max(check["max_abs_vs_coremltools"],
                                          float(np.max(np.abs(dense - ref))))
    w = np.asarray(merged[layer.kernel], np.float64)
    dense_ours = dense.transpose(np.argsort(LAYOUTS[layer.kind]))  # back to HWIO / (in, out)
    name = layer.kernel.rsplit("/", 1)[0]
    per_out = dense.reshape(dense.shape[0], -1)
    check["levels_per_channel_max"][name] = int(max(len(np.unique(r)) for r in per_out))
    check["rel_rms_error"][name] = float(np.sqrt(np.mean((dense_ours - w) ** 2)
                                                 / np.mean(w ** 2)))
    params[layer.kernel] = dense_ours.astype(np.float32)
  ends = [layers[i].kernel.rsplit("/", 1)[0] for i in (0, -1)]
  blocks = [k for k in check["levels_per_channel_max"] if k not in ends]
  if max(check["levels_per_channel_max"][k] for k in blocks) > 2 ** bits:
    raise AssertionError(f"a decoded block kernel has more than {2 ** bits} values in a "
                         f"channel: {check['levels_per_channel_max']}")
  if check["max_abs_vs_coremltools"] != 0.0:
    raise AssertionError("our LUT decode differs from coremltools' by "
                         f"{check['max_abs_vs_coremltools']}")
  acc = run.evaluate_params(traverse_util.unflatten_dict(params, sep="/"))
  return acc, {**check, "stem_head": ends, "stem_head_bits": first_last}


def decode_lut(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """``constexpr_lut_to_dense`` (iOS 18, scalar LUT) in NumPy: ``lut`` of shape
  ``(G0, 1, ..., 1, K, 1)`` against ``indices`` of shape ``(O, ...)``, one palette per
  group of ``O / G0`` output channels."""
  groups, k = lut.shape[0], lut.shape[-2]
  if lut.shape[-1] != 1 or any(s != 1 for s in lut.shape[1:-2]):
    raise ValueError(f"decode_lut: expected a per-output-channel scalar LUT, got {lut.shape}")
  table = lut.reshape(groups, k)
  rows = np.arange(indices.shape[0]) // (indices.shape[0] // groups)
  flat = indices.reshape(indices.shape[0], -1).astype(np.int64)
  return table[rows[:, None], flat].reshape(indices.shape)


# -- the rows ---------------------------------------------------------------------------

def run_label(cfg, fp_workdir: str) -> str:
  """The ledger's name of the FP run in ``fp_workdir`` (``cfg``: its config)."""
  return f"{net_key(cfg)}/{os.path.basename(os.path.normpath(fp_workdir))}"


def run_entry(run: Run, given: str, qat_ledger: str) -> dict:
  forms = run.report.get("forms", {})
  return {"workdir": given, "seed": int(run.cfg.seed), "net": net_key(run.cfg),
          "title": net_title(run.cfg), "test_images": sum(
              int(np.asarray(b["mask"]).sum()) for b in run.batches),
          "report": {k: forms[k].get("accuracy") for k in ("merged", "ptq", "qat", "packed")
                     if k in forms},
          "report_bits": forms.get("ptq", {}).get("weight_bits"),
          "clusterqat": clusterqat_of(run, qat_ledger),
          "calib_batches": int(run.cfg.quant.calib_batches),
          "qat_batch_size": int(run.cfg.qat.batch_size),
          "first_last_bits": int(run.cfg.quant.first_last_bits)}


def run_method(run: Run, method: str, scratch: str, calib: int) -> tuple[float, dict]:
  tool, bits, act = METHODS[method]
  if tool == "float":
    return run.evaluate_params(run.merged["params"]), {}
  if tool == "ort":
    return ort_row(run, bits, run.calibration(calib))
  if tool == "coreml":
    return coreml_row(run, bits, scratch)
  return run.evaluate_quantized("uniform" if tool == "ptq" else "cluster", bits, act), {}


def load(path: str) -> dict:
  return sr.read_json(path) or {"runs": {}, "rows": {}}


def save(path: str, ledger: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_text(path, json.dumps(ledger, indent=1, sort_keys=True) + "\n")


def run_all(fp_workdirs: list[str], given: list[str], scratch: str, ledger_path: str,
            methods: tuple[str, ...], command: str, started: float) -> None:
  for fp, shown in zip(fp_workdirs, given):
    ledger = load(ledger_path)
    todo = None
    run = None
    for method in methods:
      if _ONLY.value and not re.search(_ONLY.value, method):
        continue
      if _MAX_MINUTES.value and time.time() - started >= 60 * _MAX_MINUTES.value:
        print(f"--max_minutes spent: stopping before {shown} {method}", flush=True)
        return
      if run is None:
        # The label needs the config only: skip a run whose every row is in the ledger.
        import ml_collections
        rep = sr.read_json(os.path.join(fp, "report.json"))
        if rep is None:
          print(f"{shown}: no report.json (not finished): skipped", flush=True)
          break
        cfg = ml_collections.ConfigDict(rep["config"])
        label = run_label(cfg, fp)
        todo = [m for m in methods if f"{label}/{m}" not in ledger["rows"]
                and (not _ONLY.value or re.search(_ONLY.value, m))]
        if not todo:
          print(f"{label}: every row in the ledger", flush=True)
          break
        t = time.time()
        run_dir = os.path.join(scratch, label.replace("/", "_"))
        run = Run(fp, run_dir)
        ledger = load(ledger_path)
        ledger["runs"][label] = run_entry(run, shown, _QAT_LEDGER.value)
        save(ledger_path, ledger)
        print(f"{label}: loaded, merged and read the test split in {time.time() - t:.0f} s",
              flush=True)
      if method not in todo:
        continue
      tool, bits, act = METHODS[method]
      t = time.time()
      acc, details = run_method(run, method, run_dir, _CALIB.value)
      ledger = load(ledger_path)
      ledger["rows"][f"{label}/{method}"] = {
          "run": label, "method": method, "tool": tool, "weight_bits": bits, "act_bits": act,
          "accuracy": acc, "details": details, "seconds": round(time.time() - t, 1),
          "command": command, "commit": study_ledger.code_version(), "machine": sr.machine()}
      save(ledger_path, ledger)
      print(f"{label} {method}: {100 * acc:.2f}% ({time.time() - t:.0f} s)", flush=True)


# -- the page ---------------------------------------------------------------------------

def _cells(ledger: dict, labels: list[str]) -> dict:
  """``{(tool, act): {bits: [accuracy % per run]}}`` of the runs ``labels``, with the
  float network under ``("float", None)`` and ClusterQAT's forms from the runs' entries."""
  cells = collections.defaultdict(lambda: collections.defaultdict(list))
  for label in labels:
    for r in ledger["rows"].values():
      if r["run"] == label:
        cells[(r["tool"], r["act_bits"])][r["weight_bits"]].append(100 * r["accuracy"])
    for b, c in ledger["runs"][label]["clusterqat"].items():
      for form in ("qat", "packed"):
        if c.get(form) is not None:
          cells[(form, c["act_bits"])][int(b)].append(100 * c[form])
  return cells


def _seeds_of(ledger: dict, labels: list[str]) -> list[int]:
  return [ledger["runs"][k]["seed"] for k in labels]


def markdown(ledger: dict) -> str:
  rows = list(ledger["rows"].values())
  out = ["# Stock quantization tools against ClusterQAT", "",
         f"Written by `python -m experiments.{NAME}` from its ledger (`{NAME}_rows.json`); "
         "rerun with `--report_only` to rewrite it.", ""]
  if not rows:
    return "\n".join(out + ["No row has finished yet."]) + "\n"
  commits = sorted({r["commit"] for r in rows})
  machines = sorted({(r["machine"]["nproc"], r["machine"]["cpu"], r["machine"]["jax"])
                     for r in rows})
  dates = sorted(r["machine"]["date"] for r in rows)
  calib = ", ".join(str(n) for n in sorted({r["details"]["calib_images"] for r in rows
                                            if r["tool"] == "ort"})) or "–"
  out += ["- Commands: " + "; ".join(f"`{c}`" for c in sorted({r["command"] for r in rows})),
          f"- Code: {', '.join(commits)}; dates {dates[0][:10]} to {dates[-1][:10]}",
          "- Machine: " + "; ".join(f"{n} CPU core(s) (nproc), {cpu}, jax {j}"
                                    for n, cpu, j in machines),
          "- Runs (trainer workdirs, as given to `--fp_workdirs`): "
          + ", ".join(f"`{v['workdir']}`" for _, v in sorted(ledger["runs"].items())),
          "",
          "Every row quantizes the same merged float network (the run's FP checkpoint, one "
          "3x3 conv a block) and is evaluated on the run's full test split. Stem and head "
          "weights stay at 8 bits in every row (ONNX Runtime's QInt4 rows: QInt8 there by "
          "`TensorQuantOverrides`; the palettizer's: 8-bit LUTs); the bits are those of "
          "the block layers. The tools' rows:", "",
          "- **ONNX Runtime** (`onnxruntime.quantization.quantize_static`, "
          "`benchmarks/bench_common.quantize_static_onnx`): the float ONNX export, ONNX "
          "Runtime's basic graph optimizations, then QDQ with per-channel symmetric weights "
          "(QInt8 or QInt4) and QUInt8 activations, both min-max (the default calibrator) on "
          f"the first {calib} training images (unaugmented); run by ONNX Runtime's CPU provider. 3 and 2 bits "
          "are no ONNX Runtime weight type.",
          "- **coremltools** (`coremltools.optimize.coreml.palettize_weights`, "
          "`OpPalettizerConfig(mode=\"kmeans\", granularity=\"per_grouped_channel\", "
          "group_size=1)`: one 2^b-entry LUT per output channel, scikit-learn's k-means++ "
          "with one init) on the ML program of `export_coreml`. Core ML predicts only on "
          "Apple platforms: the palettized program's LUTs and indices are decoded in NumPy "
          "and evaluated in our float deploy network, as Core ML runs a weight-only "
          "palettized model (float activations).",
          "- **ours, stock PTQ**: the trainer's `ptq` row (`qat.stock_baseline`: uniform "
          "per-channel, the MSE step), with 8-bit activations (MSE steps on the trainer's "
          "calibration batches, as ONNX Runtime's rows quantize activations) or with float "
          "activations (as the palettizer's rows).",
          "- **ours, k-means fit**: the per-channel k-means codebooks ClusterQAT starts "
          "from, before any QAT (the palettizer's method in our implementation), float "
          "activations.",
          "- **ClusterQAT**: not run here; the run's own report (fake-quant and packed "
          "file), or the QAT rows of `experiments/qat_length.py` for its FP rows.", ""]
  nets = collections.defaultdict(list)
  for label, v in sorted(ledger["runs"].items()):
    nets[v["net"]].append(label)
  for net, labels in nets.items():
    title = ledger["runs"][labels[0]]["title"]
    seeds = _seeds_of(ledger, labels)
    cells = _cells(ledger, labels)
    out += [f"## {title}", "",
            f"Top-1 (%) on {ledger['runs'][labels[0]]['test_images']:,} test images, mean ± "
            f"std over seeds {', '.join(map(str, seeds))} (a cell of fewer runs says how "
            f"many). Float (merged network): "
            f"{study_ledger.mean_std(cells[('float', None)][None], '–')}.", "",
            "| tool | W8 | W4 | W3 | W2 |", "|---|---:|---:|---:|---:|"]
    for key, name in TITLES.items():
      if key not in cells:
        continue
      row = []
      for b in BITS:
        v = cells[key].get(b, [])
        row.append(study_ledger.mean_std(v, "–")
                   + (f" ({len(v)} runs)" if v and len(v) != len(labels) else ""))
      out.append(f"| {name} | " + " | ".join(row) + " |")
    out += ["", "Per seed:", "",
            "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---:|" * len(seeds)]
    per = collections.defaultdict(dict)
    for label in labels:
      for r in ledger["rows"].values():
        if r["run"] == label:
          per[r["method"]][label] = f"{100 * r['accuracy']:.2f}"
      for b, c in ledger["runs"][label]["clusterqat"].items():
        for form in ("qat", "packed"):
          if c.get(form) is not None:
            per[f"clusterqat_{form}_w{b}a{c['act_bits'] or 32}"][label] = f"{100 * c[form]:.2f}"
    order = [m for m in METHODS if m in per] + sorted(m for m in per if m not in METHODS)
    for m in order:
      out.append(f"| `{m}` | " + " | ".join(per[m].get(k, "–") for k in labels) + " |")
    out += ["", *_agreement(ledger, labels), *_checks(ledger, labels), ""]
  return "\n".join(out).rstrip() + "\n"


def _agreement(ledger: dict, labels: list[str]) -> list[str]:
  """Whether the float row and our stock PTQ row at the trainer's bits reproduce the runs'
  reports (``merged`` and ``ptq``)."""
  out = []
  for form, method in (("merged", lambda e: "float"),
                       ("ptq", lambda e: f"ptq_w{e['report_bits']}a8")):
    pairs = []
    for label in labels:
      e = ledger["runs"][label]
      row = ledger["rows"].get(f"{label}/{method(e)}")
      if e["report"].get(form) is not None and row is not None:
        pairs.append((100 * e["report"][form], 100 * row["accuracy"]))
    if pairs:
      same = all(abs(a - b) < 1e-9 for a, b in pairs)
      out.append(f"- The run's report, `{form}`: "
                 + ", ".join(f"{a:.2f}" for a, _ in pairs)
                 + (" (the same here)" if same else "; here " +
                    ", ".join(f"{b:.2f}" for _, b in pairs)))
  return (["Against the runs' own reports:", "", *out, ""]) if out else []


def _checks(ledger: dict, labels: list[str]) -> list[str]:
  """What the tools' files hold: ONNX Runtime's weight types and graphs, the decode check."""
  out = []
  rows = [r for r in ledger["rows"].values() if r["run"] in labels]
  by_method = collections.defaultdict(list)
  for r in rows:
    if r["tool"] in ("ort", "coreml"):
      by_method[r["method"]].append(r["details"])
  for m in (m for m in METHODS if m in by_method and METHODS[m][0] == "ort"):
    ds = by_method[m]
    types = collections.Counter(ds[0]["kernel_types"].values())
    ops = ds[0]["optimized_ops"]
    out.append(f"- `{m}`: kernels stored as "
               + ", ".join(f"{n} x {t}" for t, n in sorted(types.items()))
               + f"; Q/DQ ops in domain {', '.join(ds[0]['qdq_domains'])}; block kernels' "
               f"integers in [{min(d['block_int_range'][0] for d in ds)}, "
               f"{max(d['block_int_range'][1] for d in ds)}], at most "
               f"{max(d['block_levels_per_channel_max'] for d in ds)} a channel; ONNX "
               "Runtime's optimized graph runs "
               + ", ".join(f"{v} {k}" for k, v in ops.items()
                           if k in ("Conv", "QLinearConv", "Gemm", "QGemm", "DequantizeLinear"))
               + f" ({ds[0]['calib_images']} calibration images)")
  for m in (m for m in METHODS if m in by_method and METHODS[m][0] == "coreml"):
    ds, bits = by_method[m], METHODS[m][1]
    blocks = [k for k in ds[0]["levels_per_channel_max"] if k not in ds[0]["stem_head"]]
    errs = [d["rel_rms_error"][k] for d in ds for k in blocks]
    out.append(f"- `{m}`: the NumPy decode equals coremltools' own decompression (max abs "
               f"difference {max(d['max_abs_vs_coremltools'] for d in ds):g}); block layers "
               f"at most {max(d['levels_per_channel_max'][k] for d in ds for k in blocks)} "
               f"values a channel (2^{bits} = {2 ** bits}); relative RMS error of the block "
               f"kernels against the float ones {min(errs):.3f} to {max(errs):.3f}")
  return (["What the tools produced:", ""] + out) if out else []


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  started = time.time()
  workdir = os.path.abspath(_WORKDIR.value)
  results = workdir if _SMOKE.value else _RESULTS.value
  ledger_path = os.path.join(results, f"{NAME}_rows.json")
  out = os.path.join(results, f"{NAME}.md")
  if not _REPORT_ONLY.value:
    import jax
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a test suite's cache is kept
      jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    given = list(_FP_WORKDIRS.value)
    methods = tuple(METHODS)
    if _SMOKE.value:
      methods = SMOKE_METHODS
      if not given:  # an FP run of the tiny config
        from configs import tiny
        from repvgg_jax.train.train import train_and_evaluate
        cfg = tiny.tiny_config()
        cfg.quant.method = "none"
        given = [os.path.join(workdir, "tiny_fp")]
        train_and_evaluate(cfg, given[0])
    if not given:
      raise app.UsageError("--fp_workdirs: give at least one FP workdir (or --smoke)")
    paths = [os.path.abspath(p) for p in given]
    shown = [study_ledger._in_repo(p) for p in paths]
    run_all(paths, shown, os.path.join(workdir, "scratch"), ledger_path, methods,
            study_ledger.command(sys.argv), started)
  ledger = load(ledger_path)
  findings = study_ledger.findings_of(out)
  atomic_write_text(out, markdown(ledger) + ("\n" + findings if findings else ""))
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  app.run(main)

"""report.json, report.md and figures in the workdir (process 0 only), and whether a workdir
holds a finished run (:func:`finished_report`)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from repvgg_jax import analysis, plots
from repvgg_jax.deploy import coreml, onnx
from repvgg_jax.train import export
from repvgg_jax.fileio import atomic_write, atomic_write_text

FORMS = ("fp", "merged", "ptq", "qat", "packed", "stablehlo", "integer", "onnx", "openvino",
         "coreml")
LABELS = {"fp": "train-form FP", "merged": "merged FP",
          "ptq": "stock PTQ: uniform per-channel, no QAT", "qat": "QAT (fake-quant)",
          "packed": "packed export", "stablehlo": "model.stablehlo",
          "integer": "integer forward (int8 x int8 -> int32)",
          "onnx": "model.onnx in ONNX Runtime",
          "openvino": "model.onnx in OpenVINO (CPU, f32)",
          "coreml": "model.mlpackage (Core ML)"}


def _bits(r: Mapping[str, Any]) -> str:
  """``W4A8``; float weights or activations (no ``*_bits``) read ``W32``/``A32``."""
  w, a = r.get("weight_bits"), r.get("act_bits")
  return f"W{w or 32}A{a or 32}"


def _param_bytes(params: Any) -> int:
  import jax
  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params)))


def dataset_info(loader: Any) -> dict:
  """``{"name", "num_classes", "classes"}`` of a ``data.Loader`` for the report."""
  return {"name": loader.dataset, "num_classes": loader.num_classes,
          "classes": list(loader.classes)}


def finished_report(cfg: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The report of ``workdir`` when it holds a finished run of ``cfg`` (resolved): the
  same config in report.json, and every file that report and the installed exporters
  call for present; else None."""
  path = os.path.join(workdir, "report.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      report = json.load(f)
  except ValueError:
    return None
  if report.get("config") != json.loads(cfg.to_json_best_effort()):
    return None
  forms, ec = report.get("forms", {}), cfg.export
  files = []
  if cfg.quant.method != "none":
    files += ["model.packed", "model.stablehlo"]
    for form, switch, available in (("onnx", ec.onnx, onnx.available),
                                    ("coreml", ec.coreml, coreml.available)):
      if export.wanted(switch, available) != (form in forms):
        return None  # an exporter installed or removed since: export again
      if form in forms and "error" not in forms[form]:
        files.append("model.onnx" if form == "onnx" else "model.mlpackage")
  if not all(os.path.exists(os.path.join(workdir, f)) for f in files):
    return None
  return report


def write_report(workdir: str, forms: Mapping[str, Mapping[str, Any]], config: Any,
                 histograms: Mapping[str, Mapping[str, Any]], timings: Mapping[str, float],
                 dataset: Mapping[str, Any] | None = None,
                 fp_variables: Mapping[str, Any] | None = None,
                 bit_allocation: Mapping[str, Any] | None = None) -> dict:
  """Writes report.json, report.md, weight_histograms.png and accuracy.png (and
  channel_outliers.png, bits_by_layer.png); returns the report.

  Args:
    forms: ``{"fp": {"accuracy": ...}, ...}``; forms not run are left out, forms
      not evaluated have no ``accuracy``.
    histograms: ``{label: variables}`` for :func:`plots.plot_weight_histograms`.
    timings: seconds per stage, summed over the invocations that trained it.
    dataset: ``dataset_info(loader)``, or None.
    fp_variables: the train-form FP variables; if given, the per-channel
      outliers of their merge (:func:`analysis.channel_outliers`) go into the
      report as ``channel_outliers`` and channel_outliers.png.
    bit_allocation: the ``quant.budget`` allocation (``qat.allocate_bits``), if any:
      ``bit_allocation`` in the report, its table and bits_by_layer.png.
  """
  report = {"forms": {k: dict(v) for k, v in forms.items()},
            "config": json.loads(config.to_json_best_effort()),
            "seconds": dict(timings)}
  if dataset:
    report["data"] = dict(dataset)
  if histograms:
    report["outliers"] = {label: analysis.outlier_stats(v)["summary"]
                          for label, v in histograms.items()}
    atomic_write(os.path.join(workdir, "weight_histograms.png"),
                 lambda tmp: plots.plot_weight_histograms(histograms, tmp))
  if fp_variables is not None:
    report["channel_outliers"] = _channel_outliers(workdir, fp_variables)
  if bit_allocation is not None:
    report["bit_allocation"] = dict(bit_allocation)
    atomic_write(os.path.join(workdir, "bits_by_layer.png"),
                 lambda tmp: _plot_bits(bit_allocation, tmp))
  atomic_write(os.path.join(workdir, "accuracy.png"), lambda tmp: _plot_accuracy(forms, tmp))
  atomic_write_text(os.path.join(workdir, "report.json"), json.dumps(report, indent=2))
  atomic_write_text(os.path.join(workdir, "report.md"), markdown(report))
  return report


def markdown(report: Mapping[str, Any]) -> str:
  """The Markdown table of ``report``: one row per form."""
  lines = []
  if report.get("data"):
    d = report["data"]
    classes = ", ".join(d["classes"][:20]) + (", ..." if len(d["classes"]) > 20 else "")
    lines += [f"Dataset: {d['name']}, {d['num_classes']} classes"
              + (f" ({classes})" if classes else ""), ""]
  lines += ["| form | bits | top-1 accuracy | size (bytes) |", "|---|---|---:|---:|"]
  for k in FORMS:
    if k in report["forms"]:
      r = report["forms"][k]
      size = f"{r['size_bytes']:,}" if "size_bytes" in r else ""
      acc = f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else "not evaluated"
      lines.append(f"| {LABELS[k]} | {_bits(r)} | {acc} | {size} |")
  out = "\n".join(lines) + "\n"
  forms = report["forms"]
  if "accuracy" in forms.get("ptq", {}) and "accuracy" in forms.get("packed", {}):
    gain = 100 * (forms["packed"]["accuracy"] - forms["ptq"]["accuracy"])
    out += (f"\nThe stock baseline is what a stock PTQ tool gives at the same bits: the merged "
            f"network's weights rounded to a uniform per-channel grid (MSE step), the same "
            f"activation steps, no QAT. The packed model is {gain:+.2f} points from it.\n")
  if "integer" in report["forms"]:
    out += (f"\nThe integer forward predicts as the packed model on "
            f"{100 * report['forms']['integer']['agreement']:.2f}% of the test images.\n")
  onnx = report["forms"].get("onnx", {})
  ref = "the integer forward" if "integer" in report["forms"] else "the packed model"
  if "agreement" in onnx:
    acts = (f"{onnx['act_bits']}-bit activations as {onnx['activations']}"
            if onnx.get("act_bits") else "float activations")
    out += (f"\nONNX Runtime runs model.onnx ({acts}) and predicts "
            f"as {ref} on {100 * onnx['agreement']:.2f}% of the test images.\n")
    ov = report["forms"].get("openvino", {})
    if "agreement" in ov:
      out += (f"OpenVINO runs the same file (CPU, {ov['precision']} float ops) and predicts "
              f"as {ref} on {100 * ov['agreement']:.2f}% of them.\n")
  elif "error" in onnx:
    out += f"\nmodel.onnx was not written: {onnx['error']}\n"
  coreml = report["forms"].get("coreml", {})
  if "error" in coreml:
    out += f"\nmodel.mlpackage was not written: {coreml['error']}\n"
  elif coreml:
    out += ("\nmodel.mlpackage holds the packed codebooks and indices as Core ML LUTs; Core ML "
            "predicts only on Apple platforms, so it was not evaluated here.\n")
  if "bit_allocation" in report:
    a = report["bit_allocation"]
    out += (f"\nBits per block layer under the budget ({a['budget_bytes']:,.0f} bytes of "
            f"quantized kernels; chosen: {a['kernel_bytes']:,}; sensitivity: "
            f"{a['sensitivity']}; stem and head at their own bits):\n\n"
            "| layer | weights | bits | packed bytes |\n|---|---:|---:|---:|\n")
    for path, l in a["layers"].items():
      out += f"| {path} | {l['weights']:,} | {l['bits']} | {l['bytes']:,} |\n"
  if "outliers" in report:
    out += "\n| merged weights | max abs/std | kurtosis |\n|---|---:|---:|\n"
    for label, s in report["outliers"].items():
      out += f"| {label} | {s['max_over_std']:.1f} | {s['kurtosis']:.1f} |\n"
  if "channel_outliers" in report:
    out += _channel_outliers_markdown(report["channel_outliers"])
  if report.get("seconds"):
    out += "\nSeconds per stage (summed over invocations): " + ", ".join(
        f"{k} {v:.0f}" for k, v in report["seconds"].items()) + "\n"
  return out


def _channel_outliers(workdir: str, fp_variables: Mapping[str, Any]) -> dict:
  """Summary of the merged FP model's per-channel outliers; draws channel_outliers.png."""
  per_layer = analysis.channel_outliers(fp_variables)

  def plot(tmp: str) -> None:
    fig = plots.plot_channel_outliers(per_layer, tmp, title="merged FP")  # selects Agg
    import matplotlib.pyplot as plt
    plt.close(fig)

  atomic_write(os.path.join(workdir, "channel_outliers.png"), plot)
  return analysis.channel_outlier_summary(per_layer)


def _channel_outliers_markdown(s: Mapping[str, Any]) -> str:
  counts = ", ".join(f"{b} {n}" for b, n in s["branch_counts"].items())
  out = (f"\nPer-channel outliers of the merged FP kernels (max|w|/rms in one output channel, "
         f"what a per-channel quantizer's range sees): worst {s['worst_ratio']:.1f} in "
         f"{s['worst_layer']} channel {s['worst_channel']} ({s['worst_branch']} branch); "
         f"largest weight of each channel from: {counts}.")
  if s["worst_ratio_3x3"] is not None:
    out += (f" The 3x3 branch alone: worst {s['worst_ratio_3x3']:.1f} "
            f"({s['worst_3x3_layer']} channel {s['worst_3x3_channel']}).")
  return out + "\n"


def _plot_bits(allocation: Mapping[str, Any], path: str) -> None:
  """Bits per block layer (bars) beside each layer's weight count (line, log scale)."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  layers = list(allocation["layers"])
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers)), 3.6))
  ax.bar(range(len(layers)), [allocation["layers"][p]["bits"] for p in layers], color="C0")
  ax.set_ylabel("weight bits", color="C0")
  ax.set_xticks(range(len(layers)), [p.split("/")[0] for p in layers], rotation=60,
                fontsize=7)
  size = ax.twinx()
  size.plot(range(len(layers)), [allocation["layers"][p]["weights"] for p in layers],
            "o-", color="C1")
  size.set_yscale("log")
  size.set_ylabel("weights in the layer", color="C1")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_accuracy(forms: Mapping[str, Mapping[str, Any]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  keys = [k for k in FORMS if "accuracy" in forms.get(k, {})]
  fig, ax = plt.subplots(figsize=(5, 3.2))
  acc = [100 * forms[k]["accuracy"] for k in keys]
  ax.bar([LABELS[k] for k in keys], acc, color="tab:blue")
  for i, a in enumerate(acc):
    ax.text(i, a, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_ylim(max(0, min(acc, default=0) - 10), 100)
  ax.tick_params(axis="x", labelsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

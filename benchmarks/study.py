"""Reproduction study on Fashion-MNIST: BN vs OABN, uniform PTQ, uniform QAT, ClusterQAT.

  python benchmarks/study.py --workdir runs/study
  python benchmarks/study.py --workdir runs/study --report_only
  python benchmarks/study.py --smoke --workdir /tmp/study_smoke

Rows (same data, model and steps each): FP RepVGG-A0 (``--blocks`` to change its
depth; the demo's ``configs/demo.py`` settings otherwise) with BN and with OABN;
then, from each norm's FP checkpoint (``init_from``), post-training uniform
per-channel quantization at 8/6/4 bits, uniform QAT and ClusterQAT at 4/3/2
bits (``--seeds`` QAT seeds at 4 and 2 bits). Each row runs
``repvgg_jax.train.pipeline.run`` in ``<workdir>/<row>``: a row with a
``report.json`` is skipped, any other resumes from its checkpoints, so the
same command continues a stopped study. The Markdown (``--out``) holds the
setup, the tables and two figures saved beside it; everything after the line
``<!-- findings -->`` of an existing file is kept when it is regenerated.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.* are imported as modules.

from absl import app, flags, logging  # noqa: E402
from repvgg_jax.fileio import atomic_write_text  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory: one subdirectory per row.")
_BLOCKS = flags.DEFINE_list("blocks", [], "Blocks per stage of RepVGG-A0, e.g. 1,2,4,1 (the "
                            "demo's shallow A0); empty = A0's own 2,4,14,1.")
_FP_STEPS = flags.DEFINE_integer("fp_steps", 1200, "FP training steps.")
_QAT_STEPS = flags.DEFINE_integer("qat_steps", 200, "QAT steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of FP and QAT training.")
_SUBSET = flags.DEFINE_integer("train_subset", 0, "First N training examples (0 = all).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Fashion-MNIST IDX directory ('' = default).")
_FIRST_LAST = flags.DEFINE_integer("first_last_bits", 8, "Bits of the stem and the head.")
_SEEDS = flags.DEFINE_integer("seeds", None, "QAT seeds at 4 and 2 bits (default 2; smoke 1).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, synthetic 16 px data, 4 steps, "
                           "1 seed: checks the script (20 short rows).")
_OUT = flags.DEFINE_string("out", None, "Markdown file (default docs/results.md; smoke: "
                           "<workdir>/results.md).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only regenerate the Markdown.")
_ONLY = flags.DEFINE_string("only", "", "Run only the rows whose name matches this regex "
                            "(e.g. 'fp_|_bn_'); the Markdown covers every finished row.")
flags.mark_flags_as_required(["workdir"])

NORMS = ("bn", "oabn")
PTQ_BITS = (8, 6, 4)
QAT_BITS = (4, 3, 2)
SEEDED_BITS = (4, 2)
METHODS = ("uniform PTQ", "uniform QAT", "ClusterQAT")
MARKER = "<!-- findings -->"
DIVERGED = "diverged.json"  # written in a row's directory when its training hit a NaN/inf
# Fields of study.json that fix every row's config: a resumed study must keep them.
FIXED = ("smoke", "model", "blocks", "cifar_stem", "image_size", "data_source", "data_dir",
         "train_subset", "fp_steps", "qat_steps", "batch_size", "first_last_bits")


@dataclasses.dataclass(frozen=True)
class Row:
  """One pipeline run: ``method`` "none" is the FP row of ``norm``."""
  norm: str
  method: str
  bits: int = 0
  qat: bool = False
  seed: int = 0

  @property
  def name(self) -> str:
    if self.method == "none":
      return f"fp_{self.norm}"
    return f"{'qat' if self.qat else 'ptq'}_{self.method}_w{self.bits}_{self.norm}_s{self.seed}"

  @property
  def label(self) -> str:
    if self.method == "none":
      return "FP"
    if self.method == "cluster":
      return "ClusterQAT"
    return "uniform QAT" if self.qat else "uniform PTQ"


def make_rows(seeds: int) -> list[Row]:
  """FP rows first (the others start from their checkpoints), then PTQ, QAT seed 0,
  the other seeds: a partial study already compares BN and OABN everywhere."""
  rows = [Row(n, "none") for n in NORMS]
  rows += [Row(n, "uniform", b) for b in PTQ_BITS for n in NORMS]
  for s in range(seeds):
    for method in ("uniform", "cluster"):
      for b in QAT_BITS:
        if s == 0 or b in SEEDED_BITS:
          rows += [Row(n, method, b, True, s) for n in NORMS]
  return rows


def base_config(smoke: bool):
  if smoke:
    from configs.tiny import tiny_config
    return tiny_config()
  from configs.demo import get_config
  return get_config()


def study_settings() -> dict:
  """The resolved settings of this invocation's flags."""
  smoke = _SMOKE.value
  cfg = base_config(smoke)
  blocks = list(cfg.model.blocks)
  if not smoke:
    try:
      blocks = [int(b) for b in _BLOCKS.value]
    except ValueError:
      blocks = None
    if blocks is None or len(blocks) not in (0, 4) or any(b < 1 for b in blocks):
      raise app.UsageError(f"--blocks={','.join(_BLOCKS.value)}: expected 4 positive ints "
                           "or nothing")
    cfg.fp.num_steps, cfg.qat.num_steps = _FP_STEPS.value, _QAT_STEPS.value
    cfg.fp.batch_size = cfg.qat.batch_size = _BATCH.value
    cfg.data.train_subset, cfg.data.data_dir = _SUBSET.value, _DATA_DIR.value
  seeds = _SEEDS.value if _SEEDS.value is not None else (1 if smoke else 2)
  if seeds < 1:
    raise app.UsageError(f"--seeds={seeds} must be >= 1")
  return {"smoke": smoke, "model": cfg.model.name, "blocks": blocks,
          "cifar_stem": cfg.model.cifar_stem,
          "image_size": cfg.data.image_size,
          "data_source": cfg.data.source, "data_dir": cfg.data.data_dir,
          "train_subset": cfg.data.train_subset, "fp_steps": cfg.fp.num_steps,
          "qat_steps": cfg.qat.num_steps, "batch_size": cfg.fp.batch_size,
          "first_last_bits": _FIRST_LAST.value, "seeds": seeds}


def row_config(row: Row, s: dict, workdir: str):
  """The pipeline config of ``row`` under the study settings ``s``."""
  from repvgg_jax.train import config as config_lib
  cfg = base_config(s["smoke"])
  cfg.model.blocks = tuple(s["blocks"])
  cfg.fp.num_steps, cfg.qat.num_steps = s["fp_steps"], s["qat_steps"]
  cfg.fp.batch_size = cfg.qat.batch_size = s["batch_size"]
  for stage in (cfg.fp, cfg.qat):
    stage.warmup_steps = min(stage.warmup_steps, stage.num_steps // 10)
  cfg.data.train_subset, cfg.data.data_dir = s["train_subset"], s["data_dir"]
  cfg.seed = row.seed
  cfg.model.norm = row.norm
  cfg.quant.method = row.method
  cfg.quant.bits = row.bits or cfg.quant.bits
  cfg.quant.first_last_bits = s["first_last_bits"]
  cfg.qat.enabled = row.qat
  if row.method != "none":
    cfg.init_from = fp_ckpt_dir(workdir, row.norm)
    cfg.eval_fp_forms = False  # The FP row of the norm has them.
  config_lib.validate(cfg)
  return cfg


def fp_ckpt_dir(workdir: str, norm: str) -> str:
  return os.path.join(workdir, f"fp_{norm}", "checkpoints", "fp")


def machine() -> dict:
  import flax
  import jax
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "nproc": nproc,
          "cpu": cpu, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version()}


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_study(workdir: str, settings: dict | None) -> dict:
  """study.json of ``workdir``, checked against (and updated with) ``settings``."""
  path = os.path.join(workdir, "study.json")
  study = read_json(path) or {"settings": None, "runs": []}
  if settings is None:
    if study["settings"] is None:
      raise app.UsageError(f"{path} not found: run the study first")
    return study
  old = study["settings"]
  if old is not None:
    diff = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in FIXED if old.get(k) != settings[k]]
    if diff:
      raise app.UsageError(f"{workdir} holds a study with other settings ({'; '.join(diff)}); "
                           "pass the same flags or another --workdir")
  study["settings"] = settings
  study["runs"].append({"command": "python " + shlex.join(
      [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), **machine()})
  os.makedirs(workdir, exist_ok=True)
  atomic_write_text(path, json.dumps(study, indent=2))
  return study


def step_seconds(row_dir: str, stage: str, batch: int) -> float | None:
  """Median seconds per training step of ``stage`` from metrics.jsonl (first interval,
  which holds the compilation, left out when there are others)."""
  path = os.path.join(row_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  ips = []
  with open(path) as f:
    for ln in f:
      v = json.loads(ln).get(f"{stage}/images_per_s")
      if v:
        ips.append(v)
  if not ips:
    return None
  return float(batch / np.median(ips[1:] if len(ips) > 1 else ips))


def finished(workdir: str, row: Row) -> str | None:
  """``"report"``, ``"diverged"`` or None (not finished) for ``row``."""
  if os.path.exists(os.path.join(workdir, row.name, "report.json")):
    return "report"
  if os.path.exists(os.path.join(workdir, row.name, DIVERGED)):
    return "diverged"
  return None


def run_rows(workdir: str, study: dict) -> None:
  from repvgg_jax.train import pipeline
  from repvgg_jax.train.loop import NonFiniteLoss
  s = study["settings"]
  rows = make_rows(s["seeds"])
  todo = [r for r in rows if finished(workdir, r) is None]
  done = len(rows) - len(todo)
  if _ONLY.value:
    todo = [r for r in todo if re.search(_ONLY.value, r.name)]
  n_fp = sum(r.method == "none" for r in todo)
  n_qat = sum(r.qat for r in todo)
  print(f"study: {len(rows)} rows = 2 FP + 2 norms x ({len(PTQ_BITS)} PTQ + 2 QAT methods x "
        f"({len(QAT_BITS)} bits + {len(SEEDED_BITS)} x {s['seeds'] - 1} extra seeds)); "
        f"{done} done, {len(todo)} to run: {n_fp} FP x {s['fp_steps']} steps, "
        f"{n_qat} QAT x {s['qat_steps']} steps, {len(todo) - n_fp - n_qat} PTQ", flush=True)
  for i, row in enumerate(todo):
    t = time.time()
    print(f"[{i + 1}/{len(todo)}] {row.name} ...", flush=True)
    row_dir = os.path.join(workdir, row.name)
    try:
      report = pipeline.run(row_config(row, s, workdir), row_dir)
    except NonFiniteLoss as e:
      # A diverged row is a result: record it and go on with the others.
      atomic_write_text(os.path.join(row_dir, DIVERGED), json.dumps({"error": str(e)}))
      print(f"[{i + 1}/{len(todo)}] {row.name}: diverged: {e}", flush=True)
      continue
    acc = ", ".join(f"{k} {100 * v['accuracy']:.2f}%" for k, v in report["forms"].items()
                    if "accuracy" in v)
    print(f"[{i + 1}/{len(todo)}] {row.name}: {acc} ({time.time() - t:.0f} s)", flush=True)


# --- Aggregation -------------------------------------------------------------


def fp_variables(workdir: str, norm: str, s: dict) -> dict | None:
  """Train-form variables of the FP row of ``norm`` (None before it has a checkpoint)."""
  from repvgg_jax import data
  from repvgg_jax.train import pipeline
  from repvgg_jax.train.state import build_model, init_variables
  path = fp_ckpt_dir(workdir, norm)
  if not os.path.isdir(path):
    return None
  cfg = row_config(Row(norm, "none"), s, workdir)
  loader = data.make_loader(cfg.data, "test", global_batch_size=cfg.eval_batch_size, train=False)
  model = build_model(cfg.model, loader.num_classes, deploy=False)
  try:
    return pipeline.load_variables(path, init_variables(model, loader.image_shape, cfg.seed))
  except FileNotFoundError:
    return None


def mean_spread(values: list[float]) -> str:
  """``mean`` in %, with ``± (max - min) / 2`` over seeds when there are several."""
  if not values:
    return "—"
  m = 100 * np.mean(values)
  if len(values) == 1:
    return f"{m:.2f}"
  return f"{m:.2f} ± {50 * (max(values) - min(values)):.2f}"


def collect(workdir: str, s: dict) -> dict:
  """``{(label, bits, norm): [report, ...]}`` of the finished rows."""
  out = {}
  for row in make_rows(s["seeds"]):
    rep = read_json(os.path.join(workdir, row.name, "report.json"))
    if rep is not None:
      out.setdefault((row.label, row.bits, row.norm), []).append(rep)
  return out


def diverged_counts(workdir: str, s: dict) -> dict:
  """``{(label, bits, norm): count}`` of the rows whose training diverged."""
  out = {}
  for row in make_rows(s["seeds"]):
    if finished(workdir, row) == "diverged":
      key = (row.label, row.bits, row.norm)
      out[key] = out.get(key, 0) + 1
  return out


def plot_accuracy_vs_bits(groups: dict, fp_acc: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  colors = {"uniform PTQ": "tab:gray", "uniform QAT": "tab:blue", "ClusterQAT": "tab:red"}
  styles = {"bn": ("--", "s"), "oabn": ("-", "o")}
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for norm in NORMS:
    if norm in fp_acc:
      ax.axhline(100 * fp_acc[norm], color="k", ls=styles[norm][0], lw=0.8,
                 label=f"FP {norm.upper()}")
    for method in METHODS:
      pts = sorted((b, [r["forms"]["packed"]["accuracy"] for r in reps])
                   for (m, b, n), reps in groups.items() if m == method and n == norm)
      if not pts:
        continue
      bits = [b for b, _ in pts]
      mean = [100 * np.mean(v) for _, v in pts]
      err = [50 * (max(v) - min(v)) for _, v in pts]
      ax.errorbar(bits, mean, yerr=err, color=colors[method], ls=styles[norm][0],
                  marker=styles[norm][1], capsize=3, label=f"{method} {norm.upper()}")
  ax.set_xlabel("weight bits (stem/head at --first_last_bits)")
  ax.set_ylabel("top-1 accuracy of the packed model (%)")
  ax.set_xticks(sorted({b for _, b, _ in groups} | set(PTQ_BITS)))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_markdown(workdir: str, out: str, study: dict) -> str:
  """Writes the Markdown and its figures; returns the text written."""
  from repvgg_jax import analysis
  s = study["settings"]
  rows = make_rows(s["seeds"])
  groups = collect(workdir, s)
  done = sum(len(v) for v in groups.values()) + sum(diverged_counts(workdir, s).values())
  out_dir = os.path.dirname(os.path.abspath(out))
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(out))[0]
  hist_png, acc_png = f"{stem}_weight_histograms.png", f"{stem}_accuracy_vs_bits.png"

  variables = {n: fp_variables(workdir, n, s) for n in NORMS}
  variables = {n: v for n, v in variables.items() if v is not None}
  stats = {n: analysis.outlier_stats(v) for n, v in variables.items()}
  atomic_write_text(os.path.join(workdir, "outliers.json"), json.dumps(stats, indent=2))
  fp_rep = {n: groups[("FP", 0, n)][0] for n in NORMS if ("FP", 0, n) in groups}
  fp_acc = {n: r["forms"]["merged"]["accuracy"] for n, r in fp_rep.items()}

  last = study["runs"][-1] if study["runs"] else machine()
  seconds = {}
  for reps in groups.values():
    for r in reps:
      for k, v in r.get("seconds", {}).items():
        seconds[k] = seconds.get(k, 0.0) + v
  step_t = {}
  for row in rows:
    stage = "fp" if row.method == "none" else "qat" if row.qat else None
    t = stage and step_seconds(os.path.join(workdir, row.name), stage, s["batch_size"])
    if t:
      step_t.setdefault(row.label, []).append(t)
  data = ("synthetic" if s["data_source"] == "synthetic" else "Fashion-MNIST "
          f"({s['data_source']})") + f", {s['image_size']} px, augment none, train subset " + \
      (f"{s['train_subset']:,}" if s["train_subset"] else "all")
  L = [f"# Reproduction study: {'SMOKE (not results) — ' if s['smoke'] else ''}"
       "BN vs OABN under quantization", "",
       "Generated by `benchmarks/study.py`; rerun it to update the tables (text after the "
       "findings marker is kept).", "",
       "## Setup", "",
       f"- Command: `{last['command']}`",
       f"- Date: first run {study['runs'][0]['date'] if study['runs'] else '—'}, last run "
       f"{last['date']}, report {datetime.datetime.now().isoformat(timespec='seconds')}",
       f"- Machine: {last['nproc']} CPU cores (nproc), {last['cpu']}; JAX devices "
       f"{last['devices']}",
       f"- Versions: jax {last['jax']}, flax {last['flax']}, Python {last['python']}",
       f"- Model: {s['model']}"
       f"{' with blocks ' + ','.join(map(str, s['blocks'])) if s['blocks'] else ''}, "
       f"{'stride-1 stem (cifar_stem)' if s.get('cifar_stem') else 'standard strides'}; "
       f"data: {data}",
       f"- Steps: FP {s['fp_steps']}, QAT {s['qat_steps']}; batch {s['batch_size']}; "
       f"stem/head at {s['first_last_bits']} bits; QAT seeds at {'/'.join(map(str, SEEDED_BITS))} "
       f"bits: {s['seeds']} (QAT data order; every QAT row of a norm starts from the same FP "
       "checkpoint)",
       f"- Rows finished: {done} of {len(rows)}; pipeline seconds summed over rows (fp: "
       "training or loading, and evaluating, the FP form): " +
       (", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) or "—"),
       "- Median seconds per training step: " + (", ".join(
           f"{k} {np.median(v):.3f}" for k, v in step_t.items()) or "—"), "",
       "## FP accuracy and merged-kernel outliers", "",
       "Outliers of the merged 3x3 kernels (`repvgg_jax.analysis.outlier_stats`): "
       "max|w - mean|/std and kurtosis are the maxima over layers, the fractions beyond "
       "3 and 6 std the means.", "",
       "| norm | train-form FP | merged FP | max abs/std | kurtosis | > 3 std | > 6 std |",
       "|---|---:|---:|---:|---:|---:|---:|"]
  for n in NORMS:
    r = fp_rep.get(n)
    acc = (f"{100 * r['forms']['fp']['accuracy']:.2f}% | "
           f"{100 * r['forms']['merged']['accuracy']:.2f}%" if r else "— | —")
    st = stats.get(n, {}).get("summary")
    o = (f"{st['max_over_std']:.1f} | {st['kurtosis']:.1f} | {100 * st['frac_beyond_3std']:.3f}% | "
         f"{100 * st['frac_beyond_6std']:.4f}%" if st else "— | — | — | —")
    L.append(f"| {n.upper()} | {acc} | {o} |")
  if stats:
    if len(variables) == len(NORMS):
      analysis.plot_weight_histograms({n.upper(): variables[n] for n in NORMS},
                                      os.path.join(out_dir, hist_png), log=True)
      import matplotlib.pyplot as plt
      plt.close("all")
      L += ["", f"![merged-weight histograms, BN vs OABN]({hist_png})"]
    layers = [k for k in next(iter(stats.values())) if k != "summary"]
    L += ["", "<details><summary>Per layer (max abs/std, kurtosis)</summary>", "",
          "| layer | " + " | ".join(f"{n.upper()} max/std | {n.upper()} kurt." for n in stats)
          + " |",
          "|---|" + "---:|---:|" * len(stats)]
    for k in layers:
      L.append(f"| {k} | " + " | ".join(f"{stats[n][k]['max_over_std']:.1f} | "
                                        f"{stats[n][k]['kurtosis']:.1f}" for n in stats) + " |")
    L += ["", "</details>"]

  L += ["", "## Accuracy per method, bits and norm", "",
        "Top-1 test accuracy (%); mean ± half the range over seeds where n > 1 (rows whose "
        "training hit a NaN/inf are counted as diverged, not averaged). "
        "Fake-quant: the quantized network in training form; packed: the exported file "
        "decoded. Size: the packed file.", "",
        "| method | bits | norm | n | fake-quant | packed | packed size (bytes) | vs float32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|"]
  keys = [(m, b) for m in METHODS for b in (PTQ_BITS if m == "uniform PTQ" else QAT_BITS)]
  div = diverged_counts(workdir, s)
  for m, b in keys:
    for n in NORMS:
      reps = groups.get((m, b, n), [])
      count = f"{len(reps)}" + (f" (+{div[(m, b, n)]} diverged)" if (m, b, n) in div else "")
      if not reps:
        L.append(f"| {m} | {b} | {n.upper()} | {count} | — | — | — | — |")
        continue
      size = reps[0]["forms"]["packed"]["size_bytes"]
      fp32 = reps[0]["forms"]["merged"]["size_bytes"]
      L.append(f"| {m} | {b} | {n.upper()} | {count} | "
               f"{mean_spread([r['forms']['qat']['accuracy'] for r in reps])} | "
               f"{mean_spread([r['forms']['packed']['accuracy'] for r in reps])} | "
               f"{size:,} | {fp32 / size:.1f}x |")

  L += ["", "## Deltas vs FP", "",
        "Packed accuracy minus the merged FP accuracy of the same norm (percentage points, "
        "mean over seeds); last column: OABN minus BN packed accuracy.", "",
        "| method | bits | Δ BN | Δ OABN | OABN − BN |", "|---|---:|---:|---:|---:|"]
  for m, b in keys:
    acc = {n: np.mean([r["forms"]["packed"]["accuracy"] for r in groups[(m, b, n)]])
           for n in NORMS if (m, b, n) in groups}
    cells = [f"{100 * (acc[n] - fp_acc[n]):+.2f}" if n in acc and n in fp_acc else "—"
             for n in NORMS]
    both = f"{100 * (acc['oabn'] - acc['bn']):+.2f}" if len(acc) == 2 else "—"
    L.append(f"| {m} | {b} | {' | '.join(cells)} | {both} |")
  if any(m != "FP" for m, _, _ in groups):
    plot_accuracy_vs_bits({k: v for k, v in groups.items() if k[0] != "FP"}, fp_acc,
                          os.path.join(out_dir, acc_png))
    L += ["", f"![accuracy vs bits per method and norm]({acc_png})"]

  L += ["", "## What the data shows", ""]
  findings = f"{MARKER}\n\n_To be written from the tables above._\n"
  if os.path.exists(out):
    with open(out) as f:
      old = f.read()
    if MARKER in old:
      findings = old[old.index(MARKER):]
  text = "\n".join(L) + "\n" + findings
  atomic_write_text(out, text)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  workdir = os.path.abspath(_WORKDIR.value)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    # Restoring only "state" of an FP checkpoint (init_from) is intended.
    logging.get_absl_handler().addFilter(
        lambda r: "could not be restored" not in r.getMessage())
  import jax
  # Rows compile the same eval and train steps again: reuse them across rows and restarts.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  if _REPORT_ONLY.value:
    study = load_study(workdir, None)
  else:
    study = load_study(workdir, study_settings())
    run_rows(workdir, study)
  smoke = study["settings"]["smoke"]
  out = _OUT.value or (os.path.join(workdir, "results.md") if smoke
                       else os.path.join(ROOT, "docs", "results.md"))
  write_markdown(workdir, out, study)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)

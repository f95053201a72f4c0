"""Bits where they matter, on the demo model: packed accuracy against packed size.

  python -m experiments.bits --workdir runs/bits_study             # every row; resumable
  python -m experiments.bits --workdir runs/bits_study --seeds 1   # seed 0 only
  python -m experiments.bits --report_only                        # from the ledger
  python -m experiments.bits --smoke --workdir /tmp/bits_smoke     # checks the script

The demo network (configs/demo.py: OABN branch, RepVGG-A0 widths with 1, 2, 4, 1 blocks,
Fashion-MNIST at 32 px) is trained in FP at each seed (the study's ``oabn_branch`` FP row,
``experiments/rows.py``), and from each FP checkpoint every method below runs as
ClusterQAT with 8-bit activations (stem and head at 8 bits, 200 QAT steps):

* ``uniform_w{2,3,4}``: every block layer at 2, 3, 4 bits, per-channel codebooks;
* ``mixed_avg{2,2.5,3}``: per-layer bits under ``quant.budget.avg_bits`` (the bytes of the
  uniform model at that many bits; loss sensitivity, bit choices 1, 2, 3, 4, 6, 8);
* ``group{4,16}_w2``: 2 bits, one codebook per 4 or 16 output channels;
* ``vector2_w4``: 2-vectors with 16 centroids, 2 bits a weight; ``vector2_w4_g16``: the same
  with one codebook per 16 output channels (a vector codebook per channel costs 128 bytes).

Row ``<workdir>/<method>_s<seed>`` (FP: ``fp_oabn_branch_s<seed>``) runs
``train_and_evaluate``: a row with a ``report.json`` is done, any other resumes from its
checkpoints. Each finished row goes at once
into the ledger ``experiments/results/mixed_precision_rows.json`` (the packed accuracy and bytes, the weight
bits, the chosen bits per layer, the seconds; committed), from which ``experiments/results/mixed_precision.md``
and its Pareto figure are written; the text after ``<!-- findings -->`` of that file is kept.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.*, benchmarks.*, experiments.* import however it is started

from absl import app, flags  # noqa: E402
from experiments import ledger as study_ledger, rows as sr  # noqa: E402
from repvgg_jax.fileio import atomic_write_text  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/bits_study", "One subdirectory per row.")
_OUT = flags.DEFINE_string("out", "experiments/results/mixed_precision.md", "Markdown file (ledger beside it).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "FP seeds.")
_ONLY = flags.DEFINE_string("only", "", "Run only the methods whose name contains this.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only regenerate the Markdown.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiny config on synthetic data, a few steps, "
                           "one seed, into <workdir>/mixed_precision.md: checks the script.")

REGIME = "oabn_branch"  # the demo's own (configs/demo.py)
# name -> (label, config overrides on the study's W4A8 ClusterQAT row, whose 8-bit
# activations every method keeps), in the order they run.
METHODS = {
    **{f"uniform_w{b}": (f"uniform W{b}", {"quant.bits": b}) for b in (2, 3, 4)},
    **{f"mixed_avg{a:g}": (f"mixed, avg {a:g} bits",
                           {"quant.bits": int(a), "quant.budget.avg_bits": float(a)})
       for a in (2, 2.5, 3)},
    **{f"group{g}_w2": (f"grouped g={g}, W2", {"quant.bits": 2, "quant.granularity": "group",
                                               "quant.group_size": g}) for g in (4, 16)},
    "vector2_w4": ("vector d=2, 16 centroids (2 bits a weight)",
                   {"quant.bits": 4, "quant.cluster_dim": 2}),
    "vector2_w4_g16": ("vector d=2, 16 centroids, g=16 (2 bits a weight)",
                       {"quant.bits": 4, "quant.cluster_dim": 2, "quant.granularity": "group",
                        "quant.group_size": 16}),
}
FINDINGS = "<!-- findings -->"


def study_settings() -> dict:
  if _SMOKE.value:
    return sr.settings(True, seeds=1, regimes=[REGIME], goal_regimes=[REGIME])
  return sr.settings(False, blocks=[1, 2, 4, 1], fp_steps=3000, seeds=_SEEDS.value,
                     regimes=[REGIME], goal_regimes=[REGIME])


def row_name(method: str, seed: int) -> str:
  """The row's directory and ledger key (the FP row's is the study's, whose checkpoint the
  QAT rows start from)."""
  return sr.Row(REGIME, "fp", seed).name if method == "fp" else f"{method}_s{seed}"


def row_config(method: str, seed: int, s: dict, workdir: str):
  """The pipeline config of ``method`` ("fp" or a METHODS name) at ``seed``."""
  from repvgg_jax.train import config as config_lib
  if method == "fp":
    return sr.row_config(sr.Row(REGIME, "fp", seed), s, workdir)
  cfg = sr.row_config(sr.Row(REGIME, "cluster_w4a8", seed), s, workdir)
  cfg.update_from_flattened_dict(METHODS[method][1])
  config_lib.validate(cfg)
  return cfg


def entry(report: dict, seconds: float) -> dict:
  """What the ledger keeps of a row's report."""
  packed = report["forms"].get("packed", report["forms"].get("merged", {}))
  out = {"accuracy": packed.get("accuracy"), "size_bytes": packed.get("size_bytes"),
         "weight_bits": packed.get("weight_bits"), "seconds": round(seconds, 1)}
  alloc = report.get("bit_allocation")
  if alloc:
    out["layer_bits"] = {path: layer["bits"] for path, layer in alloc["layers"].items()}
    # Each layer's measured loss increase at each bit choice, and its weight count.
    out["layer_costs"] = {path: layer["costs"] for path, layer in alloc["layers"].items()}
    out["layer_weights"] = {path: layer["weights"] for path, layer in alloc["layers"].items()}
  return out


def run(workdir: str, ledger_path: str, s: dict) -> dict:
  from repvgg_jax.train.train import train_and_evaluate
  ledger = sr.read_json(ledger_path) or {"settings": s, "runs": [], "rows": {}}
  sr.check_fixed(ledger["settings"], s, ledger_path)
  ledger["runs"].append({**sr.machine(), "command": study_ledger.command(sys.argv)})
  for seed in range(s["seeds"]):
    for method in ("fp", *METHODS):
      name = row_name(method, seed)
      report_path = os.path.join(workdir, name, "report.json")
      if name in ledger["rows"] and os.path.exists(report_path):
        # A row finished by an older script: its entry again from its report (what the
        # ledger keeps may have grown), the seconds it took kept.
        fresh = entry(sr.read_json(report_path), ledger["rows"][name]["seconds"])
        if fresh != ledger["rows"][name]:
          ledger["rows"][name] = fresh
          atomic_write_text(ledger_path, json.dumps(ledger, indent=1, sort_keys=True) + "\n")
      if name in ledger["rows"] or (method != "fp" and _ONLY.value not in method):
        continue
      print(f"{name} ...", flush=True)
      t = time.time()
      report = train_and_evaluate(row_config(method, seed, s, workdir), os.path.join(workdir, name))
      ledger["rows"][name] = entry(report, time.time() - t)
      atomic_write_text(ledger_path, json.dumps(ledger, indent=1, sort_keys=True) + "\n")
      e = ledger["rows"][name]
      print(f"{name}: {100 * e['accuracy']:.2f}%, {e['size_bytes'] or 0:,} bytes "
            f"({e['seconds']:.0f} s)", flush=True)
  return ledger


def _mean(xs: list[float]) -> float:
  return sum(xs) / len(xs)


def markdown(ledger: dict, out: str) -> str:
  """The Markdown of ``ledger``; writes the Pareto figure beside ``out``."""
  rows, seeds = ledger["rows"], ledger["settings"]["seeds"]
  lines = ["# Bits where they matter: mixed precision, grouped and vector codebooks",
           "", "Written by `python -m experiments.bits` from its ledger "
           f"(`{os.path.basename(study_ledger.path_for(out))}`); machines and commands:", ""]
  for r in ledger["runs"]:
    lines.append(f"- {r['date']}: {r['nproc']} x {r['cpu']}, jax {r['jax']}, flax {r['flax']}:"
                 f" `{r['command']}`")
  fp = [rows[row_name("fp", i)]["accuracy"] for i in range(seeds) if row_name("fp", i) in rows]
  st = ledger["settings"]
  net = (f"RepVGG-A0 widths with {', '.join(map(str, st['blocks']))} blocks" if st["blocks"]
         else f"the `{st['model']}` model")
  lines += ["", f"The demo network ({net}, OABN branch, {st['data_source']} data at "
            f"{st['image_size']} px, {st['fp_steps']} FP steps) at each seed; from its FP "
            f"checkpoint {st['qat_steps']} steps of ClusterQAT with 8-bit activations, stem "
            f"and head at {st['first_last_bits']} bits. Accuracy: the packed model's "
            "(`load_packed`) on the test split; bytes: the packed file's.", ""]
  if fp:
    lines += [f"FP (merged) accuracy: {', '.join(f'{100 * a:.2f}%' for a in fp)}.", ""]
  lines += ["| method | packed bytes (seed 0) | weight bits | "
            + " | ".join(f"seed {i}" for i in range(seeds)) + " | mean |",
            "|---|---:|---:|" + "---:|" * (seeds + 1)]
  points = {}
  for m, (label, _) in METHODS.items():
    got = [rows.get(f"{m}_s{i}") for i in range(seeds)]
    done = [g for g in got if g]
    if not done:
      continue
    accs = [f"{100 * g['accuracy']:.2f}%" if g else "" for g in got]
    lines.append(f"| {label} | {done[0]['size_bytes']:,} | {done[0]['weight_bits']} | "
                 + " | ".join(accs) + f" | {100 * _mean([g['accuracy'] for g in done]):.2f}% |")
    points[label] = (_mean([g["size_bytes"] for g in done]),
                     _mean([g["accuracy"] for g in done]), m)
  mixed = {m: rows[f"{m}_s0"]["layer_bits"] for m in METHODS
           if "layer_bits" in rows.get(f"{m}_s0", {})}
  if mixed:
    layers = list(next(iter(mixed.values())))
    measured = next((rows[f"{m}_s0"] for m in mixed if "layer_costs" in rows[f"{m}_s0"]), None)
    shown = [b for b in ("1", "2", "3", "4") if measured]
    lines += ["", "Bits per block layer chosen under each budget (seed 0)"
              + (", beside each layer's weights and its measured sensitivity (the loss "
                 "increase on the training batches with that layer alone quantized at b "
                 "bits, the others float)" if measured else "") + ":", "",
              "| layer | " + ("weights | " if measured else "")
              + "".join(f"loss +, {b} bit{'s' * (b != '1')} | " for b in shown)
              + " | ".join(METHODS[m][0] for m in mixed) + " |",
              "|---|" + "---:|" * (len(mixed) + len(shown) + bool(measured))]
    for layer in layers:
      cells = ([f"{measured['layer_weights'][layer]:,}"]
               + [f"{measured['layer_costs'][layer][b]:.4f}" for b in shown] if measured else [])
      lines.append(f"| {layer.removesuffix('/reparam_conv/kernel')} | "
                   + " | ".join(cells + [str(bits[layer]) for bits in mixed.values()]) + " |")
  figure = os.path.splitext(out)[0] + "_pareto.png"
  if points:
    _pareto(points, figure)
    lines += ["", f"![accuracy against packed bytes]({os.path.basename(figure)})"]
  return "\n".join(lines) + "\n"


def _pareto(points: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  families = {"uniform": "o-", "mixed": "s-", "group": "^", "vector": "D"}
  for family, style in families.items():
    pts = sorted((x, y, label) for label, (x, y, m) in points.items() if m.startswith(family))
    if pts:
      ax.plot([p[0] / 1e6 for p in pts], [100 * p[1] for p in pts], style, label=family)
  for label, (x, y, m) in points.items():  # the method's name beside its point
    ax.annotate(m.split("_", 1)[-1] if m.startswith(("uniform", "mixed")) else m,
                (x / 1e6, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xlabel("packed file (MB)")
  ax.set_ylabel("test accuracy (%), mean over seeds")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  out = (os.path.join(os.path.abspath(_WORKDIR.value), "mixed_precision.md") if _SMOKE.value
         else os.path.join(ROOT, _OUT.value))
  ledger_path = study_ledger.path_for(out)
  if _REPORT_ONLY.value:
    ledger = sr.read_json(ledger_path)
    if ledger is None:
      raise app.UsageError(f"{ledger_path} does not exist: run the study first")
  else:
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    ledger = run(workdir, ledger_path, study_settings())
  kept = ""
  if os.path.exists(out):
    with open(out) as f:
      text = f.read()
    kept = text[text.index(FINDINGS):] if FINDINGS in text else ""
  atomic_write_text(out, markdown(ledger, out) + ("\n" + kept if kept else "\n" + FINDINGS + "\n"))
  print(f"wrote {out} and {ledger_path}")


if __name__ == "__main__":
  app.run(main)

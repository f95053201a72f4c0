"""The Markdown and figures of the study (experiments/study.py) from its ledger.

Every number comes from the ledger's rows (``experiments/ledger.py``: each
row's ``report.json``, FP curves and seed-0 outliers); ``±`` is the sample
standard deviation over seeds (``ddof=1``), shown only where a row ran on more
than one seed.
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from experiments import ledger as study_ledger
from experiments import rows as sr
from repvgg_jax.fileio import atomic_write, atomic_write_text

MARKER = "<!-- findings: study v2 -->"
COMPARED_TO_BN = ("cluster_w2a8", "cluster_w3a8", "w4a8_ptq_mse", "w8a8_ptq_minmax")
CURVE_BITS = (2, 3, 4)


def mean_std(values, scale: float = 100.0, digits: int = 2) -> str:
  """``mean`` (times ``scale``), with ``± sample std`` (ddof=1) when there are several
  values; an em dash for none."""
  if len(values) == 0:
    return "—"
  v = scale * np.asarray(values, np.float64)
  if len(v) == 1:
    return f"{v[0]:.{digits}f}"
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def collect(rows: dict, s: dict) -> tuple[dict, dict]:
  """``({(quant, regime): {seed: report}}, {(quant, regime): diverged count})`` of the
  ledger's ``rows``."""
  reports, diverged = {}, {}
  for row in sr.rows_of(s):
    key, e = (row.quant, row.regime), rows.get(row.name)
    if e is None:
      continue
    if e["status"] == "report":
      reports.setdefault(key, {})[row.seed] = e["report"]
    else:
      diverged[key] = diverged.get(key, 0) + 1
  return reports, diverged


def accuracy(rep: dict, form: str) -> float | None:
  return rep["forms"].get(form, {}).get("accuracy")


def accuracies(reps: dict, form: str, seeds=None) -> list[float]:
  """The ``form`` accuracies of ``{seed: report}`` (those of ``seeds`` if given)."""
  return [a for seed, r in sorted(reps.items()) if seeds is None or seed in seeds
          for a in [accuracy(r, form)] if a is not None]


def curve(rows: dict, regime: str, seed: int, key: str = "fp/eval_accuracy") -> list:
  """``[step, value]`` of ``key`` (the periodic evals, or ``"fp/loss"``, the logged
  train loss) of the FP row of ``regime`` and ``seed`` in the ledger's ``rows``."""
  e = rows.get(sr.Row(regime, "fp", seed).name) or {}
  return e.get("curves", {}).get(key, [])


def convergence(rows: dict, regime: str, seeds) -> str:
  """The FP eval accuracy (mean over ``seeds``) at the last two eval steps they share."""
  curves = [{int(t): v for t, v in curve(rows, regime, s)} for s in seeds]
  curves = [c for c in curves if c]
  if not curves:
    return "—"
  steps = sorted(set.intersection(*(set(c) for c in curves)))[-2:]
  if not steps:
    return "—"
  acc = [100 * np.mean([c[t] for c in curves]) for t in steps]
  text = " → ".join(f"{a:.2f} @{t}" for t, a in zip(steps, acc))
  return text + (f" ({acc[1] - acc[0]:+.2f})" if len(acc) == 2 else "")


def final_train_loss(rows: dict, regime: str, seeds, share: float = 0.1) -> str:
  """Mean ± std over ``seeds`` of the FP train loss each seed logged in its last ``share``
  of steps: whether a longer run fits the training data better, or not."""
  losses = []
  for s in seeds:
    c = curve(rows, regime, s, "fp/loss")
    if c:
      end = c[-1][0]
      losses.append(np.mean([v for t, v in c if t > (1 - share) * end]))
  return mean_std(losses, scale=1.0, digits=3)


def worst_per_seed(reports: dict, regime: str) -> list[float]:
  """The worst merged-channel max/rms of each finished FP seed of ``regime``, in seed
  order, from the summary ``train_and_evaluate`` writes into its report."""
  return [r["channel_outliers"]["worst_ratio"] for _, r in sorted(
      reports.get(("fp", regime), {}).items()) if "channel_outliers" in r]


def plot_fp_curves(rows: dict, regimes, seeds: int, path: str) -> bool:
  """The FP train loss (left, log scale) and eval accuracy (right) of every seed of each
  regime, against the step, on one figure: early training is visible. False (nothing
  written) when no regime has a curve."""
  curves = {(g, s): (curve(rows, g, s, "fp/loss"), curve(rows, g, s))
            for g in regimes for s in range(seeds)}
  if not any(loss or acc for loss, acc in curves.values()):
    return False
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = ("-", "--", ":", "-.")
  for i, g in enumerate(regimes):
    for s in range(seeds):
      loss, acc = curves[(g, s)]
      kw = dict(color=colors[i % len(colors)], ls=styles[s % len(styles)], lw=1.0,
                label=f"{g} seed {s}")
      if loss:
        ax_loss.plot(*zip(*loss), **kw)
      if acc:
        ax_acc.plot([t for t, _ in acc], [100 * v for _, v in acc], marker=".", **kw)
  ax_loss.set_yscale("log")
  ax_loss.set_ylabel("FP train loss (logged)")
  ax_acc.set_ylabel("FP eval top-1 accuracy (%)")
  for ax in (ax_loss, ax_acc):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  ax_acc.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
  plt.close(fig)
  return True


def title(s: dict) -> str:
  """The report's title: which network the study trained."""
  net = ("RepVGG-A0 at full depth (2, 4, 14, 1 blocks)" if not s["blocks"] else
         f"the demo's shallow RepVGG-A0 ({', '.join(map(str, s['blocks']))} blocks)")
  return (f"# {'SMOKE (not results) — ' if s['smoke'] else ''}FP training regimes under "
          f"deployment quantization: {net}")


def plot_accuracy_vs_bits(reports: dict, fp_acc: dict, regimes, path: str) -> None:
  """Packed accuracy vs weight bits (A8) per regime, ClusterQAT solid and LSQ dashed,
  the regime's merged FP accuracy dotted; error bars: sample std over seeds."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, g in enumerate(regimes):
    c = colors[i % len(colors)]
    if g in fp_acc:
      ax.axhline(100 * fp_acc[g], color=c, ls=":", lw=0.9)
    for method, ls, marker in (("cluster", "-", "o"), ("lsq", "--", "s")):
      pts = [(b, accuracies(reports[(f"{method}_w{b}a8", g)], "packed"))
             for b in CURVE_BITS if (f"{method}_w{b}a8", g) in reports]
      if not pts:
        continue
      ax.errorbar([b for b, _ in pts], [100 * np.mean(v) for _, v in pts],
                  yerr=[100 * np.std(v, ddof=1) if len(v) > 1 else 0 for _, v in pts],
                  color=c, ls=ls, marker=marker, capsize=3,
                  label=f"{g} {'ClusterQAT' if method == 'cluster' else 'LSQ'}")
  ax.set_xlabel("weight bits (activations 8 bits; stem/head 8 bits)")
  ax.set_ylabel("top-1 accuracy of the packed model (%)")
  ax.set_xticks(CURVE_BITS)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, title="dotted: merged FP", title_fontsize=7)
  fig.tight_layout()
  atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
  plt.close(fig)


def _setup(study: dict, reports: dict, diverged: dict) -> list[str]:
  s, entries = study["settings"], study["rows"]
  rows, goal = sr.rows_of(s), s.get("goal_regimes", sr.GOAL_REGIMES)
  last = study["runs"][-1] if study["runs"] else sr.machine()
  done = sum(r.name in entries for r in rows)
  data = ("synthetic" if s["data_source"] == "synthetic" else
          f"Fashion-MNIST ({s['data_source']})") + f", {s['image_size']} px, augment none, " \
      f"train subset {s['train_subset'] or 'all'}"
  regimes = "; ".join(f"`{g}`: " + ", ".join(f"{k}={v!r}" for k, v in
                                             sr.regime_overrides(g, s).items())
                      for g in s["regimes"])
  commands = list(dict.fromkeys(r["command"] for r in study["runs"])) or ["—"]
  kinds = {}
  for r in rows:
    t = entries.get(r.name, {}).get("seconds")
    if t is not None:
      kinds.setdefault(r.kind, []).append(t)
  return [
      "## Setup", "",
      "- Command" + (f"s ({len(study['runs'])} runs): " if len(commands) > 1 else ": ")
      + ", ".join(f"`{c}`" for c in commands),
      f"- Dates: first run {study['runs'][0]['date'] if study['runs'] else '—'}, last run "
      f"{last['date']}, report {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- Machine: {last['nproc']} CPU cores (nproc), {last['cpu']}; JAX devices "
      f"{last['devices']}; jax {last['jax']}, flax {last['flax']}, Python {last['python']}",
      f"- Model: {s['model']}"
      f"{' with blocks ' + ','.join(map(str, s['blocks'])) if s['blocks'] else ''}, "
      f"{'stride-1 stem (cifar_stem)' if s['cifar_stem'] else 'standard strides'}; "
      f"data: {data}",
      f"- Steps: FP {s['fp_steps']} (eval every {s['fp_eval_every']}), QAT {s['qat_steps']}; "
      f"batch {s['batch_size']}; stem/head at {s['first_last_bits']} bits; FP seeds "
      f"{s['seeds']} (W8A8 min-max PTQ and W2A8 ClusterQAT on each; for "
      f"{', '.join(goal)} also W4A8 PTQ MSE and W4A8/W3A8 ClusterQAT; the other "
      "rows on seed 0; a quantization row starts from the FP checkpoint of its regime and "
      "seed)",
      f"- Regimes (overrides of the base config): {regimes}",
      f"- Rows finished: {done} of {len(rows)} ({sum(diverged.values())} diverged); median "
      "wall seconds per row: " + (", ".join(f"{k} {np.median(v):.0f} (n={len(v)})"
                                            for k, v in kinds.items()) or "—"), ""]


def _fp_section(rows: dict, s: dict, reports: dict, diverged: dict) -> list[str]:
  L = ["## FP accuracy per regime", "",
       "Top-1 test accuracy (%) of the train-form and merged FP networks; ± is the sample "
       "std over seeds. Convergence: the FP eval accuracy (mean over seeds) at the last two "
       f"evaluations during training (every {s['fp_eval_every']} steps); train loss: the FP "
       "train loss logged in the last 10% of steps (mean ± std over seeds).", "",
       "| regime | n | train-form FP | merged FP | convergence (last two evals) | train loss "
       "(last 10%) | diverged |",
       "|---|---:|---:|---:|---|---:|---:|"]
  for g in s["regimes"]:
    reps = reports.get(("fp", g), {})
    L.append(f"| {g} | {len(reps)} | {mean_std(accuracies(reps, 'fp'))} | "
             f"{mean_std(accuracies(reps, 'merged'))} | {convergence(rows, g, sorted(reps))} "
             f"| {final_train_loss(rows, g, sorted(reps))} | {diverged.get(('fp', g), 0)} |")
  return L + [""]


def _outlier_section(rows: dict, s: dict, reports: dict, out_dir: str,
                     stem: str) -> list[str]:
  from repvgg_jax import analysis, plots
  L = ["## Merged-kernel outliers per regime (seed-0 FP checkpoint)", "",
       "Per output channel of every merged block kernel, `max|w| / rms(w)` "
       "(`repvgg_jax.analysis.channel_outliers`): what a per-channel quantizer's range sees. "
       "Worst: over all channels and layers, with the branch whose folded contribution is "
       "largest at that weight; 3x3 alone: the same with the identity and 1x1 taps left out. "
       "Per tensor (`analysis.outlier_stats`): max|w - mean|/std and kurtosis, maxima over "
       "layers. Every seed: the worst max/rms of each finished FP seed.", "",
       "| regime | worst max/rms | layer | channel | branch | worst 3x3 alone | channels by "
       "branch of the max (3x3 / 1x1 / identity) | max abs/std | kurtosis | every seed |",
       "|---|---:|---|---:|---|---:|---|---:|---:|---|"]
  figures, tables, zeros = [], [], {}
  for g in s["regimes"]:
    record = rows.get(sr.Row(g, "fp", 0).name, {}).get("outliers")
    if record is None:
      L.append(f"| {g} | — | | | | | | | | |")
      continue
    per_layer = study_ledger.per_layer_arrays(record)
    c = analysis.channel_outlier_summary(per_layer)
    t, zeros[g] = record["tensors"], record["zero_fraction"]
    counts = " / ".join(str(c["branch_counts"].get(b, 0)) for b in analysis.BRANCHES)
    r3 = "—" if c["worst_ratio_3x3"] is None else f"{c['worst_ratio_3x3']:.2f}"
    worst = worst_per_seed(reports, g)
    L.append(f"| {g} | {c['worst_ratio']:.2f} | {c['worst_layer']} | {c['worst_channel']} | "
             f"{c['worst_branch']} | {r3} | {counts} | {t['max_over_std']:.1f} | "
             f"{t['kurtosis']:.1f} | {' / '.join(f'{w:.2f}' for w in worst)} |")
    png = f"{stem}_channels_{g}.png"
    atomic_write(os.path.join(out_dir, png),
                 lambda tmp: plots.plot_channel_outliers(per_layer, tmp, title=g))
    import matplotlib.pyplot as plt
    plt.close("all")
    figures += [f"![per-channel max/rms, {g}]({png})", ""]
    tables += [f"<details><summary>{g}: per layer</summary>", "",
               analysis.channel_outlier_table(per_layer), "</details>", ""]
  cols = [f"{clip} w{b}" for clip in study_ledger.ZERO_CLIPS for b in study_ledger.ZERO_BITS]
  Z = ["### Weights a uniform grid rounds to zero", "",
       "Share of the merged weights (all block layers but the stem, mean over layers) that a "
       "per-channel signed uniform grid rounds to zero (`repvgg_jax.analysis.zero_fraction`): "
       "min-max step `max|w| / (2^(b-1) - 1)` (at 2 bits the step is `max|w|`, so only weights "
       "above `max|w| / 2` survive), or the MSE-optimal step.", "",
       "| regime | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
  Z += [f"| {g} | " + " | ".join(f"{100 * zeros[g][c]:.1f}%" for c in cols) + " |"
        for g in s["regimes"] if g in zeros]
  return L + [""] + Z + [""] + figures + tables


def _accuracy_section(s: dict, reports: dict, diverged: dict, fp_merged: dict) -> list[str]:
  L = ["## Accuracy per quantization row and regime", "",
       "Top-1 test accuracy (%); ± is the sample std over seeds where n > 1. Fake-quant: the "
       "quantized network in training form (`qat` form; PTQ rows have it too); packed: the "
       "exported file decoded. Δ FP: packed minus the merged FP accuracy of the same regime, "
       "both as means over the seeds the row ran on (points). Diverged rows (NaN/inf in "
       "training) are counted, not averaged.", "",
       "| row | regime | n | fake-quant | packed | Δ FP | diverged |",
       "|---|---|---:|---:|---:|---:|---:|"]
  for q, (label, _, _, _) in sr.QUANT_ROWS.items():
    for g in s["regimes"]:
      reps = reports.get((q, g), {})
      packed = accuracies(reps, "packed")
      fp = [fp_merged[g][seed] for seed in reps if seed in fp_merged.get(g, {})]
      delta = f"{100 * (np.mean(packed) - np.mean(fp)):+.2f}" if packed and fp else "—"
      L.append(f"| {label} | {g} | {len(reps)} | {mean_std(accuracies(reps, 'qat'))} | "
               f"{mean_std(packed)} | {delta} | {diverged.get((q, g), 0)} |")
  return L + [""]


def _diff(a: dict, b: dict) -> str:
  """Mean of ``a`` minus mean of ``b`` ({seed: accuracy}) over the seeds both ran on,
  in points, with n and each side's sample std when n > 1."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return "—"
  x, y = [a[k] for k in seeds], [b[k] for k in seeds]
  text = f"{100 * (np.mean(x) - np.mean(y)):+.2f}"
  if len(seeds) > 1:
    text += (f" (n={len(seeds)}, std {100 * np.std(x, ddof=1):.2f} / "
             f"{100 * np.std(y, ddof=1):.2f})")
  return text


def _comparison_section(s: dict, reports: dict) -> list[str]:
  regimes = s["regimes"]
  def packed(q: str, g: str) -> dict:
    return {seed: a for seed, r in reports.get((q, g), {}).items()
            if (a := accuracy(r, "packed")) is not None}
  L = ["## Comparisons", "",
       "Differences of mean packed accuracy (points) over the seeds both sides ran on; where "
       "that is more than one seed, n and each side's sample std over them (first side / "
       "second side).", "",
       "| comparison | " + " | ".join(regimes) + " |", "|---|" + "---:|" * len(regimes)]
  for b in CURVE_BITS:
    L.append(f"| W{b}A8: ClusterQAT − LSQ | " + " | ".join(
        _diff(packed(f"cluster_w{b}a8", g), packed(f"lsq_w{b}a8", g)) for g in regimes) + " |")
  if "bn" in regimes:
    for q in COMPARED_TO_BN:
      L.append(f"| {sr.QUANT_ROWS[q][0]}: regime − BN | " + " | ".join(
          "" if g == "bn" else _diff(packed(q, g), packed(q, "bn")) for g in regimes) + " |")
  return L + [""]


def write_markdown(ledger: dict, out: str) -> str:
  """Writes the Markdown of ``ledger`` (``study_ledger.load``) and its figures; returns
  the text written."""
  s, rows = ledger["settings"], ledger["rows"]
  reports, diverged = collect(rows, s)
  out_dir = os.path.dirname(os.path.abspath(out))
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(out))[0]
  fp_merged = {g: {seed: accuracy(r, "merged") for seed, r in reps.items()
                   if accuracy(r, "merged") is not None}
               for (q, g), reps in reports.items() if q == "fp"}
  fp_acc = {g: np.mean(list(v.values())) for g, v in fp_merged.items() if v}

  L = [title(s), "",
       "Generated by `python -m experiments.study`; rerun it to update the tables (text after the "
       "findings marker is kept).", ""]
  L += _setup(ledger, reports, diverged)
  L += _fp_section(rows, s, reports, diverged)
  png = f"{stem}_fp_curves.png"
  if plot_fp_curves(rows, s["regimes"], s["seeds"], os.path.join(out_dir, png)):
    L += [f"![FP train loss and eval accuracy per regime and seed]({png})", ""]
  L += _outlier_section(rows, s, reports, out_dir, stem)
  L += _accuracy_section(s, reports, diverged, fp_merged)
  L += _comparison_section(s, reports)
  if any(q.startswith(("cluster_w", "lsq_w")) and q.endswith("a8") for q, _ in reports):
    png = f"{stem}_accuracy_vs_bits.png"
    plot_accuracy_vs_bits(reports, fp_acc, s["regimes"], os.path.join(out_dir, png))
    L += [f"![packed accuracy vs weight bits, ClusterQAT and LSQ per regime]({png})", ""]

  L += ["## What the data shows", ""]
  findings = f"{MARKER}\n\n_To be written from the tables above._\n"
  if os.path.exists(out):
    with open(out) as f:
      old = f.read()
    if MARKER in old:
      findings = old[old.index(MARKER):]
  text = "\n".join(L) + "\n" + findings
  atomic_write_text(out, text)
  return text

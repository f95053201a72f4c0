"""The demo on 3 seeds: what ClusterQAT gains over the stock PTQ baseline at the demo's bits.

  python -m experiments.demo_seeds --workdir runs/demo_seeds
  python -m experiments.demo_seeds --workdir runs/demo_seeds --report_only

Runs ``configs/demo.py`` as the README's command does, with ``seed`` 0, 1 and 2, each in
``<workdir>/seed<N>`` (the trainer resumes there). Each finished run's forms go at once
into the ledger ``experiments/results/demo_seeds_rows.json`` (commit it as runs finish),
from which ``experiments/results/demo_seeds.md`` is written alone: per seed the FP network,
the stock baseline (the report's ``ptq`` row: uniform per-channel weights with the MSE
step at the same bits, the same activation steps, no QAT), QAT and the packed file, with
mean ± std over seeds and the packed model's gain over the baseline. A run the ledger has
is not run again. Pin a run to one core (``taskset -c 0``).
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.*, experiments.* import however it is started

from absl import app, flags  # noqa: E402
from experiments import ledger as study_ledger  # noqa: E402
from experiments import rows as sr  # noqa: E402
from repvgg_jax.fileio import atomic_write_text  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
FORMS = ("merged", "ptq", "qat", "packed")  # the columns, in the report's words below
TITLES = {"merged": "merged FP", "ptq": "stock PTQ (uniform, MSE, no QAT)",
          "qat": "ClusterQAT (fake-quant)", "packed": "packed file"}

_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory: one subdirectory per seed.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write the page from the ledger.")
_RESULTS = flags.DEFINE_string("results", RESULTS, "Directory of the ledger and page.")
_SMOKE = flags.DEFINE_bool("smoke", False, "configs/tiny.py instead of the demo (checks the "
                           "script); ledger and page go into the workdir.")
flags.mark_flags_as_required(["workdir"])


def run_config(seed: int, smoke: bool):
  from configs import demo, tiny
  cfg = tiny.tiny_config() if smoke else demo.get_config().unlock()
  cfg.seed = seed
  return cfg


def run_seeds(workdir: str, ledger_path: str, smoke: bool, command: str) -> None:
  from repvgg_jax.train.train import train_and_evaluate
  for seed in range(_SEEDS.value):
    name = f"seed{seed}"
    ledger = sr.read_json(ledger_path) or {"rows": {}}
    if name in ledger["rows"]:
      continue
    print(f"{name} ...", flush=True)
    t, cfg = time.time(), run_config(seed, smoke)
    report = train_and_evaluate(cfg, os.path.join(workdir, name))
    ledger = sr.read_json(ledger_path) or {"rows": {}}
    ledger["rows"][name] = {
        "seed": seed, "forms": {k: v.get("accuracy") for k, v in report["forms"].items()},
        "bits": {k: report["forms"]["packed"].get(k) for k in ("weight_bits", "act_bits")},
        "distill": cfg.qat.distill, "qat_steps": cfg.qat.num_steps,
        "seconds": round(time.time() - t, 1), "command": command,
        "commit": study_ledger.code_version(), "machine": sr.machine()}
    os.makedirs(os.path.dirname(ledger_path), exist_ok=True)
    atomic_write_text(ledger_path, json.dumps(ledger, indent=1, sort_keys=True) + "\n")
    print(f"{name}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in
                                  ledger["rows"][name]["forms"].items() if v is not None),
          flush=True)


def markdown(ledger: dict) -> str:
  """The page: setup from the ledger's rows, one row per seed, mean ± std, the gain."""
  rows = [ledger["rows"][k] for k in sorted(ledger["rows"])]
  if not rows:
    return "# The demo on 3 seeds\n\nNo run has finished yet.\n"
  b = rows[0]["bits"]
  m = rows[-1]["machine"]
  bits = f"W{b['weight_bits']}A{b['act_bits'] or 32}"
  out = [f"# The demo on {len(rows)} seeds: ClusterQAT against the stock PTQ baseline at "
         f"{bits}", "",
         "Written by `python -m experiments.demo_seeds` from its ledger "
         "(`demo_seeds_rows.json`); rerun with `--report_only` to rewrite it.", "",
         f"- Command: `{rows[0]['command']}`; code: "
         + ", ".join(sorted({r['commit'] for r in rows})),
         f"- Machine: {m['nproc']} CPU core(s) (nproc), {m['cpu']}; jax {m['jax']}, "
         f"flax {m['flax']}, Python {m['python']}; dates "
         + ", ".join(r["machine"]["date"] for r in rows),
         f"- Config: `configs/demo.py` with `seed` set ({bits}, QAT {rows[0]['qat_steps']} "
         f"steps, distillation {rows[0]['distill']}); top-1 on the 10,000 test images",
         "", "| seed | " + " | ".join(TITLES[f] for f in FORMS)
         + " | packed − stock PTQ | minutes |",
         "|---|" + "---:|" * (len(FORMS) + 2)]
  gains = []
  for r in rows:
    f = r["forms"]
    gains.append(100 * (f["packed"] - f["ptq"]))
    out.append(f"| {r['seed']} | " + " | ".join(f"{100 * f[k]:.2f}" for k in FORMS)
               + f" | {gains[-1]:+.2f} | {r['seconds'] / 60:.1f} |")
  out.append("| mean ± std | " + " | ".join(
      study_ledger.mean_std([100 * r["forms"][k] for r in rows]) for k in FORMS)
             + f" | {study_ledger.mean_std(gains)} | |")
  return "\n".join(out) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  workdir = os.path.abspath(_WORKDIR.value)
  results = workdir if _SMOKE.value else _RESULTS.value
  ledger_path = os.path.join(results, "demo_seeds_rows.json")
  out = os.path.join(results, "demo_seeds.md")
  if not _REPORT_ONLY.value:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    run_seeds(workdir, ledger_path, _SMOKE.value, study_ledger.command(sys.argv))
  ledger = sr.read_json(ledger_path) or {"rows": {}}
  findings = study_ledger.findings_of(out)
  atomic_write_text(out, markdown(ledger) + ("\n" + findings if findings else ""))
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  app.run(main)

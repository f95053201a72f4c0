"""The study on Fashion-MNIST: FP training regimes under deployment quantization.

  python -m experiments.study --workdir runs/study
  python -m experiments.study --recipe full_a0 --workdir runs/study_full_a0
  python -m experiments.study --workdir runs/study --max_minutes 170
  python -m experiments.study --workdir runs/study --report_only
  python -m experiments.study --smoke --workdir /tmp/study_smoke

Regimes (``--regimes``; the overrides of each on ``configs/demo.py`` are in
``experiments/rows.py``): ``bn``, ``oabn_median`` (OABN bounding each
BN's scales by the layer's median), ``oabn_branch`` (the identity and 1x1
scales bounded by the 3x3 branch of the same channel), ``oabn_merged`` (a
penalty on each merged channel's max/rms), ``kure`` (kurtosis
regularization of the merged kernels) and ``qarepvgg`` (the QARepVGG block).
Each regime trains FP rows at ``--seeds`` seeds; from each FP checkpoint
(``init_from``) the quantization rows: W8A8 PTQ (min-max, MSE), W4A8 PTQ,
LSQ and ClusterQAT at W4A8/W3A8/W2A8, ClusterQAT W4/W2 with float
activations; stem and head at ``--first_last_bits``. W8A8 min-max PTQ and
W2A8 ClusterQAT run on every FP seed, and for the ``--goal_regimes`` (default
``bn`` and ``oabn_branch``: the goals compare them over seeds) W4A8 PTQ MSE and
W4A8/W3A8 ClusterQAT too; the other rows on seed 0. A regime the installed
``repvgg_jax`` config cannot express is refused, naming its field.

``--recipe`` names a study (``experiments.rows.RECIPES``): ``demo`` (default: the demo's
shallow A0, 3000 FP steps, experiments/results/results.md) and ``full_a0`` (A0's own 2, 4, 14, 1
blocks, 6000 FP steps, BN, OABN median and branch, KURE and QARepVGG, the goal rows
of BN, branch and QARepVGG on every seed, experiments/results/results_full_a0.md); a flag given on
the command line wins over its recipe.

Each row runs ``repvgg_jax.train.train.train_and_evaluate`` in ``<workdir>/<row>``: a row
with a ``report.json`` is skipped, any other resumes from its checkpoints; a row
whose training hits a NaN/inf is recorded (``diverged.json``) and reported as
diverged. Rows run in an order that makes a partial study informative (seed 0
of every regime first); ``--max_minutes`` stops before the next row once spent,
and the Markdown is written in every case. ``study.json`` holds the settings (a
resume with settings that change a row's config is refused) and every run's
command and machine.

Each finished row goes at once into the ledger beside the Markdown
(``<out stem>_rows.json``, ``experiments/ledger.py``; commit it with the
Markdown): the report is written from the ledger alone, so it survives the
workdir, and a study in a new workdir skips the rows the ledger has. The
Markdown (``--out``) has the setup, FP, outlier, accuracy and comparison tables
and the figures saved beside it; everything after the line
``<!-- findings: study v2 -->`` of an existing file is kept. ``--report_only``
needs only the ledger.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.*, benchmarks.*, experiments.* import however it is started

from absl import app, flags, logging  # noqa: E402
from experiments import ledger as study_ledger  # noqa: E402
from experiments import rows as sr  # noqa: E402
from repvgg_jax.fileio import atomic_write_text  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory: one subdirectory per row.")
_RECIPE = flags.DEFINE_enum("recipe", "demo", list(sr.RECIPES), "A named study: the values "
                            "of the flags it sets (experiments.rows.RECIPES) unless given.")
_REGIMES = flags.DEFINE_list("regimes", list(sr.REGIMES), "Regimes to run and report (with "
                             "--report_only: to report).")
_GOAL_REGIMES = flags.DEFINE_list(
    "goal_regimes", list(sr.GOAL_REGIMES), "Regimes whose W4A8 PTQ MSE and W4A8/W3A8 "
    "ClusterQAT rows run on every seed (the others' on seed 0).")
_BLOCKS = flags.DEFINE_list("blocks", ["1", "2", "4", "1"], "Blocks per stage of RepVGG-A0 "
                            "(the demo's shallow A0); empty = A0's own 2,4,14,1.")
_FP_STEPS = flags.DEFINE_integer("fp_steps", 3000, "FP training steps.")
_QAT_STEPS = flags.DEFINE_integer("qat_steps", 200, "QAT steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of FP and QAT training.")
_SUBSET = flags.DEFINE_integer("train_subset", 0, "First N training examples (0 = all).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Fashion-MNIST IDX directory ('' = default).")
_FIRST_LAST = flags.DEFINE_integer("first_last_bits", 8, "Bits of the stem and the head.")
_SEEDS = flags.DEFINE_integer("seeds", None, "FP seeds (default 3; smoke 1).")
_BRANCH_TAU = flags.DEFINE_float("branch_tau", sr.REGIME_DEFAULTS["branch_tau"],
                                 "oabn_branch: model.oabn_tau.")
_MERGED_W = flags.DEFINE_float("merged_weight", sr.REGIME_DEFAULTS["merged_weight"],
                               "oabn_merged: fp.penalty_weight of the channel_max penalty.")
_MERGED_T = flags.DEFINE_float("merged_target", sr.REGIME_DEFAULTS["merged_target"],
                               "oabn_merged: fp.penalty_target (max/rms).")
_KURE_W = flags.DEFINE_float("kure_weight", sr.REGIME_DEFAULTS["kure_weight"],
                             "kure: fp.penalty_weight.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, synthetic 16 px data, 4 steps, 1 seed: "
                           "checks the script (every row, short).")
_OUT = flags.DEFINE_string("out", None, "Markdown file (default: the recipe's; smoke: "
                           "<workdir>/results.md).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only regenerate the Markdown.")
_ONLY = flags.DEFINE_string("only", "", "Run only the rows whose name matches this regex "
                            "(e.g. '^fp_|_bn_'); the Markdown covers every finished row.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0.0, "Start no row after this many minutes "
                                  "of this run (0 = no limit); the Markdown is still written.")
flags.mark_flags_as_required(["workdir"])


def apply_recipe() -> None:
  """Sets each flag of ``--recipe`` that the command line did not give."""
  for name, value in sr.RECIPES[_RECIPE.value].items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value


def flag_settings() -> dict:
  """The study settings of this invocation's flags."""
  try:
    return sr.settings(
        _SMOKE.value, blocks=_BLOCKS.value, fp_steps=_FP_STEPS.value, qat_steps=_QAT_STEPS.value,
        batch_size=_BATCH.value, train_subset=_SUBSET.value, data_dir=_DATA_DIR.value,
        first_last_bits=_FIRST_LAST.value, seeds=_SEEDS.value, regimes=_REGIMES.value,
        goal_regimes=_GOAL_REGIMES.value,
        branch_tau=_BRANCH_TAU.value, merged_weight=_MERGED_W.value,
        merged_target=_MERGED_T.value, kure_weight=_KURE_W.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def _minutes(seconds: float | None) -> str:
  if seconds is None:
    return "unknown (a kind to run has no finished row yet)"
  return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 3600:.1f} h"


def run_rows(workdir: str, study: dict, ledger_path: str, started: float) -> None:
  """Runs the rows that neither the workdir nor the ledger has; the ledger takes each
  finished row at once."""
  from repvgg_jax.train.train import train_and_evaluate
  from repvgg_jax.train.loop import NonFiniteLoss
  s = study["settings"]
  rows = sr.rows_of(s)
  ledger = study_ledger.update(ledger_path, workdir, study)["rows"]
  todo = study_ledger.pending(workdir, rows, ledger)
  if _ONLY.value:
    try:
      todo = sr.select(todo, _ONLY.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  left, medians = sr.estimate(workdir, rows, todo)
  kinds = {k: sum(r.kind == k for r in todo) for k in ("FP", "PTQ", "QAT")}
  print(f"study: {len(rows)} rows ({len(s['regimes'])} regimes, {s['seeds']} FP seeds); "
        f"{sum(r.name in ledger for r in rows)} done, {len(todo)} to "
        f"run: {kinds['FP']} FP x {s['fp_steps']} steps, {kinds['QAT']} QAT x "
        f"{s['qat_steps']} steps, {kinds['PTQ']} PTQ", flush=True)
  print("time left: " + _minutes(left) + " (median seconds of finished rows: " + (
      ", ".join(f"{k} {v:.0f}" for k, v in medians.items()) or "none yet") + ")", flush=True)
  budget = 60 * _MAX_MINUTES.value
  for i, row in enumerate(todo):
    if budget and time.time() - started >= budget:
      print(f"--max_minutes={_MAX_MINUTES.value:g} spent: stopping before {row.name} "
            f"({len(todo) - i} rows not run)", flush=True)
      return
    tag = f"[{i + 1}/{len(todo)}] {row.name}"
    why = study_ledger.why_not(workdir, row, ledger, ledger_path)
    if why:
      print(f"{tag}: skipped, {why}", flush=True)
      continue
    print(f"{tag} ...", flush=True)
    t = time.time()
    row_dir = os.path.join(workdir, row.name)
    try:
      report = train_and_evaluate(sr.row_config(row, s, workdir), row_dir)
    except NonFiniteLoss as e:
      # A diverged row is a result: record it and go on with the others.
      atomic_write_text(os.path.join(row_dir, sr.DIVERGED), json.dumps({"error": str(e)}))
      print(f"{tag}: diverged: {e}", flush=True)
      study_ledger.update(ledger_path, workdir, study)
      continue
    seconds = time.time() - t
    atomic_write_text(os.path.join(row_dir, "study_seconds.json"),
                      json.dumps({"seconds": seconds}))
    acc = ", ".join(f"{k} {100 * v['accuracy']:.2f}%" for k, v in report["forms"].items()
                    if "accuracy" in v)
    print(f"{tag}: {acc} ({seconds:.0f} s)", flush=True)
    # Another study process on this workdir may have written the ledger since: update
    # (under the workdir's lock) re-reads it and adds every finished row of the workdir.
    study_ledger.update(ledger_path, workdir, study)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  started = time.time()
  apply_recipe()
  workdir = os.path.abspath(_WORKDIR.value)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    # Restoring only "state" of an FP checkpoint (init_from) is intended.
    logging.get_absl_handler().addFilter(
        lambda r: "could not be restored" not in r.getMessage())
  import jax
  # Rows compile the same eval and train steps again: reuse them across rows and restarts.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  stored = sr.read_json(os.path.join(workdir, "study.json")) or {"settings": None}
  smoke = _SMOKE.value or bool(stored["settings"] and stored["settings"]["smoke"])
  if flags.FLAGS["out"].present:
    out = _OUT.value
  else:  # the recipe's, in the repository
    out = os.path.join(workdir, "results.md") if smoke else os.path.join(ROOT, _OUT.value)
  ledger_path = study_ledger.path_for(out)
  try:
    if _REPORT_ONLY.value:
      # The workdir's rows join the ledger if it has any; else the ledger alone.
      has_workdir = stored["settings"] is not None
      if not has_workdir and not os.path.exists(ledger_path):
        raise FileNotFoundError(f"neither {workdir}/study.json nor {ledger_path} exists: "
                                "run the study first")
      ledger = (study_ledger.update(ledger_path, workdir, stored) if has_workdir
                else study_ledger.load(ledger_path))
      if flags.FLAGS["regimes"].present:  # report these only (the ledger keeps every row)
        try:
          sr.make_rows(1, _REGIMES.value)
        except ValueError as e:
          raise app.UsageError(f"--regimes: {e}") from None
        ledger = {**ledger, "settings": {**ledger["settings"], "regimes": _REGIMES.value}}
    else:
      command = study_ledger.command(sys.argv)
      settings = flag_settings()
      study_ledger.load(ledger_path, settings)  # refuses other settings before any row runs
      study = sr.load_study(workdir, settings, command)
  except (FileNotFoundError, sr.SettingsChanged) as e:  # a bad invocation: show the usage
    raise app.UsageError(str(e)) from None
  if not _REPORT_ONLY.value:  # an error in a row is the row's, with its traceback
    run_rows(workdir, study, ledger_path, started)
    ledger = study_ledger.update(ledger_path, workdir, study)
  from experiments import report as study_report
  study_report.write_markdown(ledger, out)
  print(f"wrote {out} and {ledger_path}")


if __name__ == "__main__":
  app.run(main)

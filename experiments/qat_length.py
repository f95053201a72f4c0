"""QAT length and distillation at full depth: does low-bit ClusterQAT hold on RepVGG-A0?

  python -m experiments.qat_length --workdir runs/qat_length
  python -m experiments.qat_length --workdir runs/qat_length --length 1000 --bn_distill logits
  python -m experiments.qat_length --workdir runs/qat_length --length 1000 --recipe_length 2000
  python -m experiments.qat_length --workdir runs/qat_length --report_only

The network and FP recipe are the full-depth study's (``experiments.rows`` recipe
``full_a0``: RepVGG-A0's 2, 4, 14, 1 blocks, Fashion-MNIST at 32 px, 6000 FP steps at
batch 64), so its FP rows are those of ``results_full_a0.md``. From each FP checkpoint,
ClusterQAT rows (8-bit activations, stem and head at 8 bits) that vary what that study
held fixed: the QAT length (``qat.num_steps``, cosine decay to 0 over it) and
distillation from the float merged network (``qat.distill``: off / logits).

Three phases:
  1. the curve, seed 0 of ``oabn_median``: W2A8 and W4A8 at 200, 500, 1000 and 2000
     QAT steps, with and without distillation (``--lengths``);
  2. with ``--length L`` (chosen on the curve): seeds 0-2 of ``oabn_median`` at L,
     W4A8 / W3A8 / W2A8, with and without distillation, and the same rows of ``bn``
     with ``--bn_distill`` (the better of the two), so OABN-vs-BN is measured at a QAT
     that has converged;
  3. with ``--recipe_length N``: seeds 0-2 of ``oabn_median`` at N QAT steps with
     distillation, W4A8 / W3A8 / W2A8: a longer recipe than phase 2's where the curve
     has not flattened at L, measured on every seed.

Every row runs ``repvgg_jax.train.train.train_and_evaluate`` in ``<workdir>/<row>`` and resumes
there; a finished row goes at once into the ledger
(``experiments/results/qat_length_rows.json``, commit it as rows finish), which the
report (``experiments/results/qat_length.md`` and its figure) is written from alone. A
row the ledger has is not run again, except a QAT row of code older than ``CODE_EPOCH``
(its workdir is cleared first). An FP row whose checkpoint the workdir lacks (a new
checkout or machine) is trained again before the QAT rows that need it; where it comes
out another network (float rounding changed, by the code or the machine), the rows of
the ledger's FP network move to ``ledger["earlier"]`` (reported as their own set) and
that seed's QAT rows run again. Pin a run to one core (``taskset -c 1``); the machine of
each row is in the ledger.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.*, experiments.* import however it is started

from absl import app, flags  # noqa: E402
from experiments import rows as sr  # noqa: E402
from experiments.qat_length_report import load_ledger, save_ledger, supersede, write  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
# QAT rows run before this commit are run again (their ledger entry replaced): from it on, the
# QAT and deployed forms quantize the map the global pool averages (pool_act), which moved
# a seed-0 W2A8 row by 0.27 points.
CODE_EPOCH = "7afcff7"
LENGTHS = (200, 500, 1000, 2000)
CURVE_BITS = (2, 4)
SEED_BITS = (4, 3, 2)
DISTILL = ("off", "logits")
SEEDS = 3

_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory: one subdirectory per row.")
_LENGTH = flags.DEFINE_integer("length", 0, "Phase 2's QAT length, chosen on the curve "
                               "(0 = phase 1 only).")
_BN_DISTILL = flags.DEFINE_enum("bn_distill", "logits", DISTILL, "Phase 2: the distillation "
                                "of the bn rows (the better of the two on oabn_median).")
_RECIPE_LENGTH = flags.DEFINE_integer("recipe_length", 0, "Phase 3's QAT length: every "
                                      "seed, with distillation (0 = none).")
_LENGTHS = flags.DEFINE_list("lengths", [str(n) for n in LENGTHS], "Phase 1's QAT lengths.")
_ONLY = flags.DEFINE_string("only", "", "Run only the rows whose name matches this regex.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0.0, "Start no row after this many minutes "
                                  "(0 = no limit).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write the report from the ledger.")
_RESULTS = flags.DEFINE_string("results", RESULTS, "Directory of the ledger and report (a "
                                "checkout's experiments/results, to commit rows from).")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiny config on synthetic data, a few steps "
                           "(checks the script); ledger and report go into the workdir.")
flags.mark_flags_as_required(["workdir"])


def study_settings(smoke: bool) -> dict:
  """The full-depth study's settings (``experiments.rows`` recipe ``full_a0``)."""
  recipe = sr.RECIPES["full_a0"]
  return sr.settings(smoke, blocks=recipe["blocks"], fp_steps=recipe["fp_steps"],
                     seeds=SEEDS, regimes=["oabn_median", "bn"],
                     goal_regimes=["oabn_median", "bn"])


def qat_name(regime: str, bits: int, steps: int, distill: str, seed: int) -> str:
  return f"w{bits}a8_{regime}_n{steps}_{'kd' if distill == 'logits' else 'ce'}_s{seed}"


def plan(lengths, length: int, bn_distill: str, recipe_length: int = 0) -> list[dict]:
  """Every row, in the order they run: ``{"name", "regime", "seed"}`` plus, for a QAT
  row, ``"bits", "steps", "distill"``; an FP row comes before the rows that need it."""
  rows, seen = [], set()

  def fp(regime, seed):
    name = sr.Row(regime, "fp", seed).name
    if name not in seen:
      seen.add(name)
      rows.append({"name": name, "regime": regime, "seed": seed})

  def qat(regime, bits, steps, distill, seed):
    fp(regime, seed)
    name = qat_name(regime, bits, steps, distill, seed)
    if name not in seen:
      seen.add(name)
      rows.append({"name": name, "regime": regime, "seed": seed, "bits": bits,
                   "steps": steps, "distill": distill})

  for n in lengths:
    for b in CURVE_BITS:
      for d in DISTILL:
        qat("oabn_median", b, n, d, 0)
  if length:
    for seed in range(SEEDS):
      for b in SEED_BITS:
        for d in DISTILL:
          qat("oabn_median", b, length, d, seed)
    for seed in range(SEEDS):
      for b in SEED_BITS:
        qat("bn", b, length, bn_distill, seed)
  if recipe_length:
    for seed in range(SEEDS):
      for b in SEED_BITS:
        qat("oabn_median", b, recipe_length, "logits", seed)
  return rows


def row_config(row: dict, s: dict, workdir: str):
  """The pipeline config of ``row``: the full-depth study's, with this row's QAT."""
  from repvgg_jax.train import config as config_lib
  if "bits" not in row:
    return sr.row_config(sr.Row(row["regime"], "fp", row["seed"]), s, workdir)
  cfg = sr.row_config(sr.Row(row["regime"], f"cluster_w{row['bits']}a8", row["seed"]), s,
                      workdir)
  n = 4 if s["smoke"] else row["steps"]
  cfg.qat.num_steps = n
  cfg.qat.eval_every = max(n // 4, 1)  # the curve within a run
  cfg.qat.checkpoint_every = max(n // 4, 1)
  cfg.qat.distill = row["distill"]
  cfg.export.onnx = "off"  # the packed and StableHLO forms are evaluated; ONNX adds no row
  config_lib.validate(cfg)
  return cfg


def qat_curve(row_dir: str) -> list[list[float]]:
  """``[[step, eval accuracy], ...]`` of the QAT stage in the row's metrics.jsonl."""
  from experiments.ledger import logged
  return logged(row_dir, ("qat/eval_accuracy",))["qat/eval_accuracy"]


def current(row: dict) -> bool:
  """Whether a ledger row ran code that contains :data:`CODE_EPOCH` (``commit`` with ``+``:
  uncommitted changes on top of it)."""
  import subprocess
  commit = row.get("commit", "").rstrip("+")
  return bool(commit) and subprocess.run(
      ["git", "merge-base", "--is-ancestor", CODE_EPOCH, commit], cwd=ROOT,
      capture_output=True).returncode == 0


def record(ledger_path: str, row: dict, report: dict, seconds: float, row_dir: str,
           command: str) -> None:
  """Adds the finished ``row`` to the ledger (re-read first: one writer at a time is
  assumed, rows of another process are kept)."""
  from experiments import ledger as study_ledger
  ledger = load_ledger(ledger_path)
  ledger["rows"][row["name"]] = {
      **{k: v for k, v in row.items() if k != "name"},
      "forms": {k: v.get("accuracy") for k, v in report["forms"].items()},
      "seconds": round(seconds, 1), "curve": qat_curve(row_dir), "command": command,
      "commit": study_ledger.code_version(),
      "machine": sr.machine(),
      "config": study_ledger.portable(report.get("config", {}), os.path.dirname(row_dir))}
  save_ledger(ledger_path, ledger)


def run_rows(workdir: str, rows: list[dict], s: dict, ledger_path: str, command: str,
             started: float) -> None:
  from experiments import ledger as study_ledger
  from repvgg_jax.train.train import train_and_evaluate
  from repvgg_jax.train.loop import NonFiniteLoss
  done = {k for k, r in load_ledger(ledger_path)["rows"].items()
          if "bits" not in r or current(r)}  # the FP stage has no pool_act
  todo = [r for r in rows if r["name"] not in done]
  if _ONLY.value:
    todo = [r for r in todo if re.search(_ONLY.value, r["name"])]
  # An FP row in the ledger whose checkpoint this workdir lacks (a new machine or checkout)
  # is trained again before the QAT rows that start from it; the log says whether it
  # matches the ledger's row.
  fp_again = []
  for r in todo:
    fp_name = sr.Row(r["regime"], "fp", r["seed"]).name
    if ("bits" in r and fp_name in done and fp_name not in fp_again
        and not os.path.isdir(sr.fp_ckpt_dir(workdir, r["regime"], r["seed"]))):
      fp_again.append(fp_name)
  todo = [r for r in rows if r["name"] in fp_again] + todo
  print(f"qat_length: {len(rows)} rows, {len(rows) - len(todo)} in the ledger or not "
        f"selected, {len(todo)} to run", flush=True)
  for i, row in enumerate(todo):
    if _MAX_MINUTES.value and time.time() - started >= 60 * _MAX_MINUTES.value:
      print(f"--max_minutes spent: stopping before {row['name']}", flush=True)
      return
    if "bits" in row and sr.Row(row["regime"], "fp", row["seed"]).name not in \
        load_ledger(ledger_path)["rows"]:  # an FP row of older code is still that FP network
      print(f"[{i + 1}/{len(todo)}] {row['name']}: skipped, its FP row has not finished",
            flush=True)
      continue
    print(f"[{i + 1}/{len(todo)}] {row['name']} ...", flush=True)
    t, row_dir = time.time(), os.path.join(workdir, row["name"])
    if row["name"] in fp_again:
      shutil.rmtree(row_dir, ignore_errors=True)
      report = train_and_evaluate(row_config(row, s, workdir), row_dir)
      first = load_ledger(ledger_path)["rows"][row["name"]]
      again = {k: v.get("accuracy") for k, v in report["forms"].items()}
      print(f"{row['name']}: trained again for its checkpoint: {again} "
            f"({'the same as' if again == first['forms'] else 'NOT the same as'} the "
            f"ledger's {first['forms']})", flush=True)
      if again != first["forms"]:
        # Another network (float rounding changed, by the code or the machine): the rows
        # that started from the ledger's FP move to ledger["earlier"], kept and reported as
        # their own set, and this seed's rows run again from the new checkpoint.
        why = (f"{first['machine']['date'][:10]}, commit {first['commit']}: FP "
               f"{first['forms']['merged']}; trained again {time.strftime('%Y-%m-%d')} at "
               f"{study_ledger.code_version()}: FP {again['merged']}")
        for name in supersede(ledger_path, row, why):
          if name != row["name"]:  # a finished QAT workdir of the earlier network
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        record(ledger_path, row, report, time.time() - t, row_dir, command)
        return run_rows(workdir, rows, s, ledger_path, command, started)
      continue
    if row["name"] in load_ledger(ledger_path)["rows"] and os.path.isdir(row_dir):
      print(f"{row['name']}: ran code older than {CODE_EPOCH}: clearing {row_dir}", flush=True)
      shutil.rmtree(row_dir)
    try:
      report = train_and_evaluate(row_config(row, s, workdir), row_dir)
    except NonFiniteLoss as e:
      print(f"{row['name']}: diverged: {e}", flush=True)
      report = {"forms": {}, "diverged": str(e)}
    seconds = time.time() - t
    record(ledger_path, row, report, seconds, row_dir, command)
    acc = ", ".join(f"{k} {100 * v['accuracy']:.2f}%" for k, v in report["forms"].items()
                    if "accuracy" in v)
    print(f"[{i + 1}/{len(todo)}] {row['name']}: {acc} ({seconds:.0f} s)", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  started = time.time()
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    lengths = [int(n) for n in _LENGTHS.value]
  except ValueError:
    raise app.UsageError(f"--lengths={','.join(_LENGTHS.value)}: expected integers") from None
  if any(n < 1 for n in lengths) or _LENGTH.value < 0 or _RECIPE_LENGTH.value < 0:
    raise app.UsageError("--lengths, --length and --recipe_length must be positive")
  results = workdir if _SMOKE.value else _RESULTS.value
  ledger_path = os.path.join(results, "qat_length_rows.json")
  out = os.path.join(results, "qat_length.md")
  rows = plan(lengths, _LENGTH.value, _BN_DISTILL.value, _RECIPE_LENGTH.value)
  if not _REPORT_ONLY.value:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    from experiments import ledger as study_ledger
    run_rows(workdir, rows, study_settings(_SMOKE.value), ledger_path,
             study_ledger.command(sys.argv), started)
  os.makedirs(results, exist_ok=True)
  write(load_ledger(ledger_path), out)
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  app.run(main)

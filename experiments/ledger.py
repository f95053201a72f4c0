"""The study's ledger: what each finished row gives the report, in one committed file.

A study's workdir holds the checkpoints (tens of MB per row) and is not committed;
a row known only to its workdir is lost with it. The ledger (``<out stem>_rows.json``
beside the Markdown, committed with it) keeps, for every finished row, what the
report reads: its ``report.json``, its wall seconds, whether it diverged, the FP eval
accuracy and train-loss curves, and for the seed-0 FP rows the per-channel outliers
of the merged kernels. The Markdown is written from the ledger alone, and a study
resumed in a new workdir skips the rows the ledger has. A quantization row whose FP
row is in the ledger but whose FP checkpoint is not in the workdir cannot run (the
study says so); delete that FP row's entry to train it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import subprocess

import numpy as np

from experiments import rows as sr
from repvgg_jax.fileio import atomic_write_text

CURVES = ("fp/eval_accuracy", "fp/loss")  # the metrics.jsonl keys the report reads
ZERO_BITS = (2, 3, 4)  # bits and clippings of the zero-share table
ZERO_CLIPS = ("minmax", "mse")
_DIGITS = 6  # significant digits of the stored per-channel ratios
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
RESULTS_TAIL = os.path.join("experiments", "results")


def _in_repo(arg: str) -> str:
  """A command-line argument as the ledger records it: a path (or ``--flag=path``) inside
  the repository relative to it, so the committed commands name no machine's folders; a
  checkout's ``experiments/results`` (a study run from one checkout writing its ledger into
  another's, ``--results``) as ``experiments/results``."""
  flag, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else (
      "", "", arg)
  if os.path.isabs(value) and not os.path.relpath(value, ROOT).startswith(".."):
    value = os.path.relpath(value, ROOT)
  elif os.path.isabs(value) and os.path.normpath(value).endswith(RESULTS_TAIL):
    value = RESULTS_TAIL
  return flag + eq + value


def command(argv: list[str]) -> str:
  """The study's command line ``argv`` as the ledger records it (see ``_in_repo``): a
  module of this package as ``python -m experiments.<name>``, however it was started."""
  script = _in_repo(os.path.abspath(argv[0]))
  name, ext = os.path.splitext(script)
  if os.path.dirname(name) == "experiments" and ext == ".py":
    head = ["-m", name.replace("/", ".")]
  else:
    head = [script]
  return "python " + shlex.join(head + [_in_repo(a) for a in argv[1:]])


def code_version() -> str:
  """The repository's commit (``+`` when the tree has uncommitted changes): rows of one
  study compare only when they ran the same code."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+" if dirty else "")


FINDINGS = "<!-- findings -->"  # a page's text from this line on is written by hand


def findings_of(page: str, marker: str = FINDINGS, default: str = "") -> str:
  """The hand-written end of the page at ``page``: everything from ``marker`` on (kept when
  the page is written again from its ledger), or ``default`` when there is none."""
  if not os.path.exists(page):
    return default
  with open(page) as f:
    old = f.read()
  return old[old.index(marker):] if marker in old else default


def mean_std(values: list[float], empty: str = "") -> str:
  """``"m ± s"`` (sample std) of ``values`` to 2 decimals, the value alone for one,
  ``empty`` for none."""
  if not values:
    return empty
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def path_for(out: str) -> str:
  """The ledger of the Markdown file ``out``."""
  return os.path.splitext(out)[0] + "_rows.json"


def load(path: str, settings: dict | None = None) -> dict:
  """``{"settings", "runs", "rows": {row name: entry}}`` of ``path`` (empty if there is
  none); with ``settings``, checked against the stored ones (``sr.SettingsChanged``)."""
  ledger = sr.read_json(path) or {"settings": None, "runs": [], "rows": {}}
  if settings is not None and ledger["settings"] is not None:
    sr.check_fixed(ledger["settings"], settings, path)
  return ledger


def logged(row_dir: str, keys: tuple[str, ...] = CURVES) -> dict[str, list[list]]:
  """``{key: [[step, value], ...]}`` of each metric in ``keys`` in the row's
  ``metrics.jsonl`` (one pass over the file), by step."""
  out = {k: {} for k in keys}
  path = os.path.join(row_dir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for ln in f:
        try:
          m = json.loads(ln)
        except ValueError:  # a line cut by a kill
          continue
        for k in keys:
          if k in m:
            out[k][int(m["step"])] = float(m[k])
  return {k: [[t, v] for t, v in sorted(c.items())] for k, c in out.items()}


def fp_variables(workdir: str, regime: str, s: dict) -> dict | None:
  """Train-form variables of the seed-0 FP row of ``regime`` (None before that row has
  finished: a stage in progress has checkpoints of a half-trained model)."""
  from repvgg_jax import data
  from repvgg_jax.train.checkpoint import load_variables
  from repvgg_jax.train.state import build_model, init_variables
  row = sr.Row(regime, "fp", 0)
  if sr.status(workdir, row) != "report":
    return None
  cfg = sr.row_config(row, s, workdir)
  loader = data.make_loader(cfg.data, "test", global_batch_size=cfg.eval_batch_size, train=False)
  model = build_model(cfg.model, loader.num_classes, deploy=False)
  try:
    return load_variables(sr.fp_ckpt_dir(workdir, regime, 0),
                          init_variables(model, loader.image_shape, cfg.seed))
  except FileNotFoundError:
    return None


def outliers(variables: dict) -> dict:
  """The outlier record of a seed-0 FP checkpoint: per layer the per-channel
  ``ratio``, ``branch`` and ``ratio_3x3`` of ``analysis.channel_outliers`` (lists), the
  per-tensor summary of ``analysis.outlier_stats`` and the zero shares of
  ``analysis.zero_fraction`` (mean over the block layers; the stem runs at
  first_last_bits)."""
  from repvgg_jax import analysis
  def rounded(values) -> list[float]:
    return [float(f"{x:.{_DIGITS}g}") for x in values]

  per_layer = analysis.channel_outliers(variables)
  keep = {}
  for layer, r in per_layer.items():
    keep[layer] = {"ratio": rounded(r["ratio"]), "branch": [str(b) for b in r["branch"]]}
    if "ratio_3x3" in r:
      keep[layer]["ratio_3x3"] = rounded(r["ratio_3x3"])
  zeros = {f"{clip} w{b}": float(np.mean([z for k, z in analysis.zero_fraction(
      variables, b, clip).items() if k != "stem"])) for clip in ZERO_CLIPS for b in ZERO_BITS}
  return {"per_layer": keep, "tensors": analysis.outlier_stats(variables)["summary"],
          "zero_fraction": zeros}


def per_layer_arrays(record: dict) -> dict:
  """``record["per_layer"]`` with numpy arrays, as ``analysis.channel_outliers`` returns."""
  return {layer: {k: np.asarray(v, dtype=object if k == "branch" else np.float64)
                  for k, v in r.items()} for layer, r in record["per_layer"].items()}


def portable(value, workdir: str):
  """``value`` (a report) with every string path under ``workdir`` made relative to it
  (the FP checkpoint of ``init_from``, say): the ledger is committed, and the directory
  a study ran in is no part of its result."""
  if isinstance(value, dict):
    return {k: portable(v, workdir) for k, v in value.items()}
  if isinstance(value, list):
    return [portable(v, workdir) for v in value]
  root = os.path.abspath(workdir)
  if isinstance(value, str) and os.path.isabs(value) and (
      value == root or value.startswith(root + os.sep)):
    return os.path.relpath(value, root)
  return value


def report_of(workdir: str, row: sr.Row) -> dict | None:
  """The row's ``report.json`` as the ledger keeps it (:func:`portable`)."""
  return portable(sr.read_json(os.path.join(workdir, row.name, "report.json")), workdir)


def entry(workdir: str, row: sr.Row, s: dict, with_outliers: bool = True) -> dict | None:
  """The ledger entry of ``row`` from its workdir files (None if it has not finished);
  ``with_outliers=False`` leaves out the seed-0 FP outliers (they read the checkpoint)."""
  st = sr.status(workdir, row)
  if st is None:
    return None
  d = os.path.join(workdir, row.name)
  if st == "diverged":
    return {"status": st, "error": (sr.read_json(os.path.join(d, sr.DIVERGED)) or {})
            .get("error", "")}
  e = {"status": st, "report": report_of(workdir, row),
       "seconds": sr.row_seconds(workdir, row)}
  if row.kind == "FP":
    e["curves"] = logged(d)
    if row.seed == 0 and with_outliers:
      variables = fp_variables(workdir, row.regime, s)
      if variables is not None:
        e["outliers"] = outliers(variables)
  return e


def workdir_rows(workdir: str, s: dict, with_outliers: bool = True) -> dict:
  """``{row name: entry}`` of the finished rows of ``workdir`` (settings ``s``)."""
  return {r.name: e for r in sr.rows_of(s)
          if (e := entry(workdir, r, s, with_outliers)) is not None}


def pending(workdir: str, rows: list[sr.Row], ledger_rows: dict) -> list[sr.Row]:
  """The ``rows`` that neither ``workdir`` nor the ledger's rows have finished."""
  return [r for r in rows if sr.status(workdir, r) is None and r.name not in ledger_rows]


def why_not(workdir: str, row: sr.Row, ledger_rows: dict, ledger_path: str) -> str | None:
  """Why quantization ``row`` cannot run now (its FP checkpoint is missing), or None."""
  fp_row = sr.Row(row.regime, "fp", row.seed)
  fp_status = sr.status(workdir, fp_row)
  if row.kind == "FP" or fp_status == "report":
    return None
  if fp_status == "diverged":
    return "its FP row diverged"
  if fp_row.name in ledger_rows:
    return (f"its FP row is in {ledger_path} but its checkpoint is not in this workdir "
            "(delete that row's entry to train it again)")
  return "its FP row has not finished"


@contextlib.contextmanager
def _locked(workdir: str):
  """An exclusive lock on ``<workdir>/ledger.lock`` (POSIX ``flock``): two study
  processes on one workdir update the ledger one after the other."""
  try:
    import fcntl
  except ImportError:  # not POSIX: no lock; a lost update is redone by the next one
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "ledger.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def update(path: str, workdir: str, study: dict) -> dict:
  """Adds the finished rows of ``workdir`` (and its runs) to the ledger at ``path``,
  writes it (atomically, under the workdir's lock) and returns it. A row in both is
  taken from the workdir when its report differs (it ran again), else kept (its
  outliers are not recomputed)."""
  with _locked(workdir):
    return _update(path, workdir, study)


def _update(path: str, workdir: str, study: dict) -> dict:
  s = study["settings"]
  ledger = load(path, s)
  rows = ledger["rows"]
  for row in sr.rows_of(s):
    old = rows.get(row.name)
    st = sr.status(workdir, row)
    if st is None or (old is not None and old["status"] == st and
                      old.get("report") == report_of(workdir, row)):
      continue
    rows[row.name] = entry(workdir, row, s)
  known = {(r["date"], r["command"]) for r in ledger["runs"]}
  ledger["runs"] += [r for r in study["runs"] if (r["date"], r["command"]) not in known]
  ledger["runs"].sort(key=lambda r: r["date"])
  if ledger["settings"] is not None:  # seeds and regimes may grow; the rows stay
    s = dict(s, seeds=max(s["seeds"], ledger["settings"]["seeds"]),
             regimes=list(dict.fromkeys(ledger["settings"]["regimes"] + s["regimes"])))
  ledger["settings"] = s
  ledger["rows"] = dict(sorted(rows.items()))
  atomic_write_text(path, dumps(ledger))
  return ledger


def dumps(ledger: dict) -> str:
  """JSON with one line per row (the per-channel lists make an indented file long), so
  that a diff of the ledger shows the rows that changed."""
  head = {k: v for k, v in ledger.items() if k != "rows"}
  rows = ",".join(f"\n  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
                 for k, v in ledger["rows"].items())
  return json.dumps(head, indent=1)[:-2] + ',\n "rows": {' + rows + "\n }\n}\n"

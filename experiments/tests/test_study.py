"""experiments/study.py's rows, configs, formatting and resume checks (no training)."""

import json
import os
import shutil

import pytest

from experiments import ledger as study_ledger, report as study_report, rows as sr  # root on sys.path: conftest.py
from repvgg_jax.train import config as config_lib

from _util import raises_naming

SEED0 = ("fp", "w8a8_ptq_minmax", "w4a8_ptq_mse", "cluster_w2a8", "cluster_w4a8", "lsq_w2a8",
         "lsq_w4a8", "cluster_w3a8", "lsq_w3a8")


def test_row_order_and_names():
  names = [r.name for r in sr.make_rows(2, ("bn", "kure"))]
  expected = [f"{q}_{g}_s0" for q in SEED0 for g in ("bn", "kure")]
  expected += [f"{q}_{g}_s1" for q in ("fp", "w8a8_ptq_minmax", "cluster_w2a8")
               for g in ("bn", "kure")]
  expected += [f"{q}_bn_s1" for q in sr.GOAL_ROWS]  # kure is not a goal regime
  expected += [f"{q}_{g}_s0" for q in ("w8a8_ptq_mse", "cluster_w4", "cluster_w2")
               for g in ("bn", "kure")]
  assert names == expected


def test_every_quant_row_once_per_regime_on_seed_0_and_seeded_rows_on_every_seed():
  rows = sr.make_rows(3)
  n = len(sr.REGIMES)
  assert len(rows) == len(set(rows)) == n * (1 + len(sr.QUANT_ROWS)) + n * 2 * 3 + 2 * 2 * 3
  for g in sr.REGIMES:
    seeded = sr.EVERY_SEED + (sr.GOAL_ROWS if g in sr.GOAL_REGIMES else ())
    for q in ("fp",) + seeded:
      assert [r.seed for r in rows if (r.regime, r.quant) == (g, q)] == [0, 1, 2]
    for q in set(sr.QUANT_ROWS) - set(seeded):
      assert [r.seed for r in rows if (r.regime, r.quant) == (g, q)] == [0]
  # Every quantization row comes after the FP row it starts from.
  order = {r: i for i, r in enumerate(rows)}
  assert all(order[r] > order[sr.Row(r.regime, "fp", r.seed)] for r in rows if r.kind != "FP")


def test_goal_regimes_setting_runs_their_goal_rows_on_every_seed():
  s = sr.settings(False, seeds=2, regimes=("bn", "qarepvgg"), goal_regimes=("qarepvgg",))
  seeded = {(r.regime, r.quant) for r in sr.rows_of(s) if r.seed == 1}
  assert {("qarepvgg", q) for q in sr.GOAL_ROWS} <= seeded
  assert not {("bn", q) for q in sr.GOAL_ROWS} & seeded
  # Settings stored before the field existed keep the rows they had.
  old = {k: v for k, v in s.items() if k != "goal_regimes"}
  assert sr.rows_of(old) == sr.make_rows(2, ("bn", "qarepvgg"))


def test_unknown_regime_is_named():
  with pytest.raises(ValueError, match="'batchnorm'"):
    sr.make_rows(1, ("bn", "batchnorm"))
  with pytest.raises(ValueError, match="'qa'"):
    sr.make_rows(1, ("bn",), goal_regimes=("qa",))


@pytest.mark.parametrize("smoke", [True, False])
def test_every_row_config_validates(smoke, tmp_path):
  regimes = sr.available_regimes()
  assert {"bn", "oabn_median"} <= set(regimes)
  s = sr.settings(smoke, regimes=regimes)
  assert s["seeds"] == (1 if smoke else 3)
  for row in sr.make_rows(2, regimes):
    cfg = sr.row_config(row, s, str(tmp_path))
    config_lib.validate(cfg)
    assert cfg.seed == row.seed and cfg.quant.first_last_bits == 8
    assert cfg.model.norm == sr.regime_overrides(row.regime, s)["model.norm"]
    if row.kind == "FP":
      assert cfg.quant.method == "none" and cfg.init_from == ""
      assert cfg.fp.eval_every == s["fp_eval_every"] > 0
    else:
      _, kind, bits, overrides = sr.QUANT_ROWS[row.quant]
      assert cfg.quant.bits == bits and cfg.qat.enabled == (kind == "QAT")
      assert all(cfg[k.split(".")[0]][k.split(".")[1]] == v for k, v in overrides.items())
      assert cfg.init_from == os.path.join(str(tmp_path), f"fp_{row.regime}_s{row.seed}",
                                           "checkpoints", "fp")
      assert cfg.eval_fp_forms is False


def test_demo_settings_follow_the_demo_config(tmp_path):
  s = sr.settings(False, regimes=("bn",))
  cfg = sr.row_config(sr.Row("bn", "fp", 0), s, str(tmp_path))
  assert tuple(cfg.model.blocks) == (1, 2, 4, 1) and cfg.data.source == "idx"
  assert (cfg.fp.num_steps, cfg.qat.num_steps, cfg.fp.batch_size) == (3000, 200, 64)
  assert cfg.fp.eval_every == 500


def test_a_regime_the_config_cannot_express_names_its_field():
  cfg = config_lib.base_config()
  if "block" in cfg.model:
    del cfg.model["block"]
  assert sr.missing_fields("qarepvgg", cfg) == ["model.block"]
  # oabn_median only sets oabn_form when the config has it.
  if "oabn_form" in cfg.model:
    del cfg.model["oabn_form"]
  assert sr.missing_fields("oabn_median", cfg) == []
  assert sr.missing_fields("oabn_branch", cfg) == ["model.oabn_form"]


def test_a_retired_regime_is_reported_from_a_ledger_but_never_run(tmp_path):
  # oabn_branch_warm's config fields are gone: the study refuses it, a ledger's rows of it
  # are still listed, with the overrides it ran with.
  with pytest.raises(ValueError, match="'oabn_branch_warm'"):
    sr.make_rows(1, ("bn", "oabn_branch_warm"))
  with pytest.raises(ValueError, match="'oabn_branch_warm'"):
    sr.settings(False, regimes=("bn", "oabn_branch_warm"))
  s = dict(sr.settings(False, seeds=1, regimes=("bn",), fp_steps=6000),
           regimes=["bn", "oabn_branch_warm"])
  assert sr.Row("oabn_branch_warm", "fp", 0) in sr.rows_of(s)
  assert sr.regime_overrides("oabn_branch_warm", s)["fp.bound_warmup_steps"] == 2000
  with raises_naming(ValueError, "fp_oabn_branch_warm_s0", "fp.bound_warmup_steps"):
    sr.row_config(sr.Row("oabn_branch_warm", "fp", 0), s, str(tmp_path))


def test_regime_settings_reach_the_overrides():
  s = sr.settings(True, regimes=("bn",), branch_tau=2.5, merged_weight=0.1, kure_weight=1.0)
  assert sr.regime_overrides("oabn_branch", s)["model.oabn_tau"] == 2.5
  assert sr.regime_overrides("oabn_merged", s)["fp.penalty_weight"] == 0.1
  assert sr.regime_overrides("oabn_merged", s)["fp.penalty_target"] == 8.0
  assert sr.regime_overrides("kure", s)["fp.penalty_weight"] == 1.0
  with pytest.raises(ValueError, match="kure_wieght"):
    sr.settings(True, regimes=("bn",), kure_wieght=1.0)


def test_mean_std_is_the_sample_std_in_percent():
  assert study_report.mean_std([]) == "—"
  assert study_report.mean_std([0.9012]) == "90.12"
  assert study_report.mean_std([0.90, 0.92]) == "91.00 ± 1.41"  # std(ddof=1) = 0.01414
  assert study_report.mean_std([0.1, 0.2, 0.3], scale=1, digits=3) == "0.200 ± 0.100"


def test_changed_fixed_settings_are_refused(tmp_path):
  workdir = str(tmp_path / "study")
  s = sr.settings(True, regimes=("bn",))
  sr.load_study(workdir, s, "first")
  sr.load_study(workdir, dict(s, seeds=3, regimes=["bn", "oabn_median"]), "more rows")
  with raises_naming(sr.SettingsChanged, "qat_steps: 4 -> 5", "kure_weight: 0.001 -> 1.0"):
    sr.load_study(workdir, dict(s, qat_steps=5, kure_weight=1.0), "changed")
  study = sr.load_study(workdir, None)
  assert [r["command"] for r in study["runs"]] == ["first", "more rows"]
  assert study["settings"]["seeds"] == 3
  assert {"nproc", "cpu", "jax", "flax", "python", "date"} <= set(study["runs"][0])
  with pytest.raises(FileNotFoundError, match="study.json"):
    sr.load_study(str(tmp_path / "none"), None)


def _finish(workdir, row, seconds):
  d = os.path.join(workdir, row.name)
  os.makedirs(d)
  with open(os.path.join(d, "report.json"), "w") as f:
    json.dump({"forms": {}, "seconds": {"fp": 1.0}}, f)
  with open(os.path.join(d, "study_seconds.json"), "w") as f:
    json.dump({"seconds": seconds}, f)


def test_time_left_from_median_seconds_per_kind(tmp_path):
  workdir = str(tmp_path)
  rows = sr.make_rows(1, ("bn", "oabn_median"))
  by_name = {r.name: r for r in rows}
  for name, t in (("fp_bn_s0", 100), ("fp_oabn_median_s0", 300), ("w8a8_ptq_minmax_bn_s0", 10)):
    _finish(workdir, by_name[name], t)
  todo = [r for r in rows if sr.status(workdir, r) is None]
  left, medians = sr.estimate(workdir, rows, todo)
  assert medians == {"FP": 200.0, "PTQ": 10.0} and left is None  # no QAT row finished
  ptq = [r for r in todo if r.kind == "PTQ"]
  assert sr.estimate(workdir, rows, ptq)[0] == 10.0 * len(ptq)


def test_convergence_and_final_train_loss_read_the_fp_curves(tmp_path):
  for seed, accs in ((0, (0.5, 0.8, 0.9)), (1, (0.5, 0.7, 0.8))):
    d = tmp_path / f"fp_bn_s{seed}"
    d.mkdir()
    # Train loss every 50 steps: 2.0 up to step 1350, then 0.2 + 0.1 * seed (the last 10%).
    lines = [json.dumps({"step": t, "fp/loss": 2.0 if t <= 1350 else 0.2 + 0.1 * seed})
             for t in range(50, 1501, 50)]
    lines += [json.dumps({"step": 500 * (i + 1), "fp/eval_accuracy": a})
              for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 15")  # a cut last line
  rows = {f"fp_bn_s{seed}": {"curves": study_ledger.logged(str(tmp_path / f"fp_bn_s{seed}"))}
          for seed in (0, 1)}
  assert rows["fp_bn_s0"]["curves"]["fp/eval_accuracy"] == [[500, 0.5], [1000, 0.8], [1500, 0.9]]
  assert study_report.convergence(rows, "bn", [0, 1]) == "75.00 @1000 → 85.00 @1500 (+10.00)"
  assert study_report.convergence(rows, "kure", [0]) == "—"
  assert study_report.final_train_loss(rows, "bn", [0, 1]) == "0.250 ± 0.071"
  assert study_report.final_train_loss(rows, "bn", [0]) == "0.200"
  assert study_report.final_train_loss(rows, "kure", [0]) == "—"


def test_bad_only_regex_is_named():
  with pytest.raises(ValueError, match=r"only='\('"):
    sr.select(sr.make_rows(1, ("bn",)), "(")


def _report(workdir, row, **acc):
  d = os.path.join(workdir, row.name)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "report.json"), "w") as f:
    json.dump({"forms": {k: {"accuracy": v} for k, v in acc.items()}, "seconds": {"fp": 2.0}}, f)


def test_markdown_from_finished_and_diverged_rows_keeps_the_findings(tmp_path):
  workdir = str(tmp_path / "study")
  s = sr.settings(True, regimes=("bn", "oabn_median"), seeds=2)
  study = sr.load_study(workdir, s, "python -m experiments.study --smoke")
  for seed, (bn, oabn) in enumerate(((0.90, 0.91), (0.92, 0.93))):
    _report(workdir, sr.Row("bn", "fp", seed), fp=bn, merged=bn)
    _report(workdir, sr.Row("oabn_median", "fp", seed), fp=oabn, merged=oabn)
  for seed, acc in enumerate((0.80, 0.84)):
    _report(workdir, sr.Row("bn", "cluster_w2a8", seed), qat=acc, packed=acc)
  _report(workdir, sr.Row("oabn_median", "cluster_w2a8", 0), qat=0.88, packed=0.88)
  os.makedirs(os.path.join(workdir, "cluster_w2a8_oabn_median_s1"))
  with open(os.path.join(workdir, "cluster_w2a8_oabn_median_s1", sr.DIVERGED), "w") as f:
    f.write("{}")
  _report(workdir, sr.Row("bn", "lsq_w2a8", 0), qat=0.70, packed=0.70)
  out = str(tmp_path / "docs" / "results.md")
  os.makedirs(os.path.dirname(out))
  with open(out, "w") as f:
    f.write(f"old tables\n{study_report.MARKER}\n\nOur findings.\n")
  ledger = study_ledger.update(study_ledger.path_for(out), workdir, study)
  text = study_report.write_markdown(ledger, out)
  assert "old tables" not in text and text.endswith(f"{study_report.MARKER}\n\nOur findings.\n")
  assert "| bn | 2 | 91.00 ± 1.41 | 91.00 ± 1.41 | — | — | 0 |" in text
  # Δ FP of bn W2A8: mean packed 82 minus mean merged FP 91 over seeds 0 and 1.
  assert "| W2A8 ClusterQAT | bn | 2 | 82.00 ± 2.83 | 82.00 ± 2.83 | -9.00 | 0 |" in text
  # oabn_median ran seed 0 only (seed 1 diverged): its FP is seed 0's 91.
  assert "| W2A8 ClusterQAT | oabn_median | 1 | 88.00 | 88.00 | -3.00 | 1 |" in text
  # Comparisons pair seeds: bn's LSQ ran on seed 0 only, so its ClusterQAT seed 0 (80).
  assert "| W2A8: ClusterQAT − LSQ | +10.00 | — |" in text
  assert "| W2A8 ClusterQAT: regime − BN |  | +8.00 |" in text
  assert "Rows finished: 9 of 33 (1 diverged)" in text
  assert "- Command: `python -m experiments.study --smoke`" in text
  assert os.path.exists(str(tmp_path / "docs" / "results_accuracy_vs_bits.png"))
  # The ledger alone (the workdir lost) gives the same Markdown but the report date.
  shutil.rmtree(workdir)
  again = study_report.write_markdown(study_ledger.load(str(tmp_path / "docs" / "results_rows.json")),
                                      out)
  assert _undated(again) == _undated(text)


def _undated(text):
  return [ln for ln in text.splitlines() if not ln.startswith("- Dates:")]


def test_the_ledger_keeps_rows_across_workdirs_and_refuses_other_settings(tmp_path):
  s = sr.settings(True, regimes=("bn",), seeds=2)
  path = str(tmp_path / "results_rows.json")
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  _report(first, sr.Row("bn", "fp", 1), fp=0.9, merged=0.9)
  study_ledger.update(path, first, sr.load_study(first, s, "first"))
  # A new workdir: its rows join those of the first, and the study runs neither.
  _report(second, sr.Row("bn", "fp", 0), fp=0.8, merged=0.8)
  ledger = study_ledger.update(path, second, sr.load_study(second, s, "second"))
  assert set(ledger["rows"]) == {"fp_bn_s0", "fp_bn_s1"}
  # Paths under the workdir are kept relative to it: the ledger is committed.
  assert study_ledger.portable({"init_from": os.path.join(second, "fp_bn_s0", "ckpt"),
                                "data": ["/elsewhere"]}, second) == \
      {"init_from": os.path.join("fp_bn_s0", "ckpt"), "data": ["/elsewhere"]}
  assert [r["command"] for r in ledger["runs"]] == ["first", "second"]
  rows = sr.make_rows(2, ("bn",))
  todo = study_ledger.pending(second, rows, ledger["rows"])
  assert sr.Row("bn", "fp", 1) not in todo and sr.Row("bn", "cluster_w2a8", 1) in todo
  # Seed 1's FP checkpoint is in the lost workdir only: its rows cannot run here.
  assert "checkpoint is not in this workdir" in study_ledger.why_not(
      second, sr.Row("bn", "cluster_w2a8", 1), ledger["rows"], path)
  assert study_ledger.why_not(second, sr.Row("bn", "cluster_w2a8", 0), ledger["rows"],
                              path) is None
  # A row another process's write dropped comes back from the workdir at the next update.
  with open(path, "w") as f:
    f.write(study_ledger.dumps({**ledger, "rows": {}}))
  assert set(study_ledger.update(path, second, sr.load_study(second, None))["rows"]) == \
      {"fp_bn_s0"}
  with raises_naming(sr.SettingsChanged, "results_rows.json", "qat_steps: 4 -> 5"):
    study_ledger.load(path, dict(s, qat_steps=5))


def test_a_ledger_update_waits_for_the_workdirs_lock(tmp_path):
  import fcntl
  import threading
  workdir, path = str(tmp_path / "w"), str(tmp_path / "results_rows.json")
  study = sr.load_study(workdir, sr.settings(True, regimes=("bn",), seeds=2), "x")
  _report(workdir, sr.Row("bn", "fp", 1), fp=0.9, merged=0.9)
  calling = threading.Event()

  def other_process():
    calling.set()
    study_ledger.update(path, workdir, study)

  with open(os.path.join(workdir, "ledger.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # another study process is updating the ledger
    thread = threading.Thread(target=other_process)
    thread.start()
    calling.wait()
    thread.join(timeout=1.0)
    assert thread.is_alive() and not os.path.exists(path)
    fcntl.flock(f, fcntl.LOCK_UN)
  thread.join(timeout=30)
  assert not thread.is_alive() and set(study_ledger.load(path)["rows"]) == {"fp_bn_s1"}


@pytest.mark.parametrize("blocks", [["1", "2", "x", "1"], [1, 2, 0, 1], [1, 2]])
def test_bad_blocks_are_named(blocks):
  with pytest.raises(ValueError, match="blocks="):
    sr.settings(False, blocks=blocks, regimes=("bn",))
  assert sr.settings(False, blocks=[], regimes=("bn",))["blocks"] == []


def test_an_unfinished_fp_row_has_no_outlier_row(tmp_path):
  # Its checkpoints hold a half-trained model: the report must not analyse them.
  workdir = str(tmp_path)
  s = sr.settings(True, regimes=("bn",))
  os.makedirs(sr.fp_ckpt_dir(workdir, "bn", 0))
  assert study_ledger.fp_variables(workdir, "bn", s) is None


def test_the_ledgers_outlier_record_gives_the_checkpoints_tables():
  import jax.numpy as jnp
  from repvgg_jax import analysis
  from repvgg_jax.models.repvgg import RepVGG, Variant
  from benchmarks.bench_common import random_variables
  v = random_variables(RepVGG(Variant((1, 1, 2, 1), (0.25,) * 4), num_classes=3),
                       jnp.zeros((1, 32, 32, 3)), tiny_var_channels=1)
  record = json.loads(json.dumps(study_ledger.outliers(v)))  # as stored and read back
  per_layer = analysis.channel_outliers(v)
  stored = study_ledger.per_layer_arrays(record)
  assert analysis.channel_outlier_table(stored) == analysis.channel_outlier_table(per_layer)
  want, got = (analysis.channel_outlier_summary(p) for p in (per_layer, stored))
  assert got["worst_ratio"] == pytest.approx(want["worst_ratio"], rel=1e-5)
  assert {k: got[k] for k in ("worst_layer", "worst_channel", "worst_branch", "branch_counts")} \
      == {k: want[k] for k in ("worst_layer", "worst_channel", "worst_branch", "branch_counts")}
  assert record["tensors"] == pytest.approx(analysis.outlier_stats(v)["summary"])
  assert set(record["zero_fraction"]) == {"minmax w2", "minmax w3", "minmax w4", "mse w2",
                                          "mse w3", "mse w4"}


def test_comparisons_pair_the_seeds_both_sides_ran_on():
  # Seed 1 ran on one side only: it is left out of both means.
  assert study_report._diff({0: .9, 1: .8, 2: .7}, {0: .5, 2: .6}) == \
      "+25.00 (n=2, std 14.14 / 7.07)"
  assert study_report._diff({1: .9}, {0: .5}) == "—"


def test_worst_channel_per_seed_comes_from_the_fp_reports():
  reports = {("fp", "bn"): {2: {"channel_outliers": {"worst_ratio": 30.0}},
                            0: {"channel_outliers": {"worst_ratio": 40.0}},
                            1: {"forms": {}}}}  # a report from before the summary existed
  assert study_report.worst_per_seed(reports, "bn") == [40.0, 30.0]
  assert study_report.worst_per_seed(reports, "kure") == []


def test_sweep_tabulates_seed_0_of_studies_that_differ_in_one_setting(tmp_path):
  from experiments import sweep as study_sweep
  dirs = []
  for tau, fp, w2 in ((6.0, 0.90, None), (1.5, 0.88, 0.85)):
    d = str(tmp_path / f"tau{tau}")
    sr.load_study(d, sr.settings(False, regimes=("oabn_branch",), seeds=1, branch_tau=tau),
                  f"python -m experiments.study --branch_tau {tau}")
    _report(d, sr.Row("oabn_branch", "fp", 0), fp=fp, merged=fp)
    if w2 is not None:
      _report(d, sr.Row("oabn_branch", "cluster_w2a8", 0), qat=w2, packed=w2)
      # This study is passed as its ledger (its workdir gone).
      ledger = str(tmp_path / f"results_tau{tau}_rows.json")
      study_ledger.update(ledger, d, sr.load_study(d, None))
      shutil.rmtree(d)
      d = ledger
    dirs.append(d)
  text = study_sweep.markdown(study_sweep.load(dirs, "branch_tau"), "branch_tau",
                              command="python -m experiments.sweep ...")
  lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
  assert lines[0].endswith("| W2A8 ClusterQAT |")  # the one quantization row either ran
  # Sorted by the setting; a row the study did not run is a dash.
  assert lines[1:] == ["| 1.5 | oabn_branch | 88.00 | 88.00 | — | — | — | — | 85.00 |",
                       "| 6.0 | oabn_branch | 90.00 | 90.00 | — | — | — | — | — |"]
  assert "`python -m experiments.study --branch_tau 6.0`" in text


def test_sweep_refuses_studies_that_differ_in_another_setting(tmp_path):
  from experiments import sweep as study_sweep
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  for d, steps in zip(dirs, (3000, 6000)):
    sr.load_study(d, sr.settings(False, regimes=("bn",), seeds=1, fp_steps=steps), "")
  with raises_naming(ValueError, "fp_steps", "3000", "6000", "branch_tau"):
    study_sweep.load(dirs, "branch_tau")
  with pytest.raises(ValueError, match="setting='tau'"):
    study_sweep.load(dirs, "tau")
  with raises_naming(ValueError, str(tmp_path / "none")):
    study_sweep.load([str(tmp_path / "none")], "fp_steps")
  assert [s["settings"]["fp_steps"] for _, s in study_sweep.load(dirs[::-1], "fp_steps")] == \
      [3000, 6000]


def test_sweep_rows_are_chosen_and_named(tmp_path):
  from experiments import sweep as study_sweep
  d = str(tmp_path / "a")
  sr.load_study(d, sr.settings(False, regimes=("bn",), seeds=1), "")
  loaded = study_sweep.load([d], "fp_steps")
  text = study_sweep.markdown(loaded, "fp_steps", rows=["w4a8_ptq_mse", "cluster_w2a8"])
  assert "| W4A8 PTQ, MSE | W2A8 ClusterQAT |" in text
  assert "| 3000 | bn | — | — | — | — | — | — | — |" in text  # its FP row has not run
  with pytest.raises(ValueError, match="rows \\['w9'\\]"):
    study_sweep.markdown(loaded, "fp_steps", rows=["w9"])
  with pytest.raises(ValueError, match="regimes \\['bm'\\]"):
    study_sweep.markdown(loaded, "fp_steps", regimes=["bm"])


def test_recipes_set_study_flags_and_make_valid_settings():
  import re
  # The flags study.py defines (importing it would define them twice beside sweep.py's).
  src = open(os.path.join(os.path.dirname(sr.__file__), "study.py")).read()
  defined = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', src))
  assert {"blocks", "fp_steps", "out", "recipe"} <= defined
  for name, recipe in sr.RECIPES.items():
    unknown = [k for k in recipe if k not in defined]
    assert not unknown, f"recipe {name}: {unknown} are not flags of experiments/study.py"
    s = sr.settings(False, **{k: v for k, v in recipe.items() if k != "out"})
    assert s["blocks"] == [int(b) for b in recipe["blocks"]]
  full = sr.settings(False, **{k: v for k, v in sr.RECIPES["full_a0"].items() if k != "out"})
  assert study_report.title(full).endswith("RepVGG-A0 at full depth (2, 4, 14, 1 blocks)")
  # Its QARepVGG goal rows run on every seed.
  assert sr.Row("qarepvgg", "cluster_w3a8", 2) in sr.rows_of(full)


def test_fp_curves_figure_is_drawn_from_the_ledger_curves(tmp_path):
  rows = {sr.Row(g, "fp", s).name: {"curves": {"fp/loss": [[1, 2.0], [10, 0.5]],
                                               "fp/eval_accuracy": [[5, 0.5], [10, 0.8]]}}
          for g in ("bn", "oabn_branch") for s in range(2)}
  path = str(tmp_path / "curves.png")
  assert study_report.plot_fp_curves(rows, ("bn", "oabn_branch"), 2, path)
  assert os.path.getsize(path) > 0
  assert not study_report.plot_fp_curves({}, ("bn",), 1, str(tmp_path / "none.png"))
  assert not os.path.exists(tmp_path / "none.png")


def test_recorded_commands_name_repository_paths_relative_to_it():
  root = study_ledger.ROOT
  inside = os.path.join(root, "runs", "study_x")
  outside = os.path.join(os.path.dirname(root), "elsewhere")
  argv = [os.path.join(root, "experiments", "study.py"), inside, f"--workdir={inside}",
          f"--out={outside}", "--seeds=3"]
  assert study_ledger.command(argv) == (
      f"python -m experiments.study runs/study_x --workdir=runs/study_x --out={outside} "
      "--seeds=3")
  # A script outside the package is recorded as it was run.
  assert study_ledger.command([os.path.join(root, "benchmarks", "speed.py"), "--quick"]) == (
      "python benchmarks/speed.py --quick")

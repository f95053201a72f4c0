"""A workdir never mixes runs: stage fingerprints, stale-stage refusal, corrupt checkpoints,
init_from, file modes, metrics after a resume, seconds summed over invocations."""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from repvgg_jax import data
from repvgg_jax.fileio import atomic_write_text
from repvgg_jax.train import checkpoint, sharding, steps, workdir as workdir_lib
from repvgg_jax.train.train import train_and_evaluate
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.loop import schedule, train_stage
from repvgg_jax.train.state import build_model, create_train_state, init_variables
from repvgg_jax.train.writers import MetricWriter, event_files, tensorboard_dir

from _util import ROOT, copy_run, killed_after, raises_naming, subprocess_env
from configs import tiny


# ----------------------------------------------------------------------------- stale stages

def test_changed_fp_config_is_refused_naming_the_field(tiny_run):
  # The bug: fp.num_steps changed, FP retrained, and the old QAT checkpoint resumed silently.
  cfg = tiny.tiny_config()
  cfg.fp.num_steps = 6
  before = sorted(glob.glob(os.path.join(tiny_run[0], "checkpoints", "*", "*")))
  with raises_naming(workdir_lib.StaleWorkdir, "fp.num_steps: 4 -> 6", "qat", "--workdir",
                     "--discard_stale") as e:
    train_and_evaluate(cfg, tiny_run[0])
  assert "\n" not in str(e.value)
  assert sorted(glob.glob(os.path.join(tiny_run[0], "checkpoints", "*", "*"))) == before


def test_changed_qat_config_keeps_fp_and_names_qat_fields(tiny_run):
  cfg = tiny.tiny_config()
  cfg.quant.bits = 3
  with raises_naming(workdir_lib.StaleWorkdir, "qat", "quant.bits: 4 -> 3") as e:
    train_and_evaluate(cfg, tiny_run[0])
  assert "fp (" not in str(e.value)


def test_a_field_added_since_the_record_counts_as_unchanged_at_its_default(tiny_run, tmp_path):
  # A workdir from before a config field existed (its record lacks the field).
  dest = copy_run(tiny_run, tmp_path)
  path = os.path.join(dest, "checkpoints", "fp.json")
  with open(path) as f:
    record = json.load(f)
  del record["config"]["model.block"]
  atomic_write_text(path, json.dumps(record))
  os.remove(os.path.join(dest, "report.json"))  # else the finished run is not run again
  train_and_evaluate(tiny.tiny_config(), dest)  # resumes: model.block is at its default
  cfg = tiny.tiny_config()
  cfg.model.block, cfg.model.oabn_form = "qarepvgg", "median"  # and the record holds the field
  with pytest.raises(workdir_lib.StaleWorkdir, match=r"model.block: 'repvgg' -> 'qarepvgg'"):
    train_and_evaluate(cfg, dest)


def test_checkpoints_without_a_record_are_refused_naming_the_missing_record(tiny_run, tmp_path):
  # A stage records its config before its first checkpoint: without the record nothing
  # says which config the checkpoints are of.
  dest = copy_run(tiny_run, tmp_path)
  os.remove(os.path.join(dest, "checkpoints", "fp.json"))
  os.remove(os.path.join(dest, "report.json"))  # else the finished run is not run again
  before = sorted(glob.glob(os.path.join(dest, "checkpoints", "*", "*")))
  with raises_naming(workdir_lib.StaleWorkdir, "fp.json", "qat"):
    train_and_evaluate(tiny.tiny_config(), dest)
  assert sorted(glob.glob(os.path.join(dest, "checkpoints", "*", "*"))) == before


def test_checkpoint_and_log_settings_are_not_part_of_the_fingerprint():
  a, b = tiny.tiny_config(), tiny.tiny_config()
  b.fp.checkpoint_every, b.qat.keep, b.log_every, b.eval_batch_size = 3, 5, 1, 8
  b.model.conv_impl = "xla"  # tiny's is "auto": how the convs run, not what they compute
  for stage in workdir_lib.STAGES:
    assert workdir_lib.fingerprint(a, stage) == workdir_lib.fingerprint(b, stage)
  b.model.norm = "bn"
  assert workdir_lib.fingerprint(a, "fp") != workdir_lib.fingerprint(b, "fp")


def test_oabn_settings_do_not_tell_two_bn_runs_apart():
  # A BN run recorded when the default OABN form was another resumes; an OABN run does not.
  # The trainer records resolved configs: the tiny network's form by depth is branch.
  from repvgg_jax.train import config as config_lib
  old, new = tiny.tiny_config(), tiny.tiny_config()
  old.model.oabn_form, old.model.oabn_tau = "median", 4.0
  for norm, changed in (("bn", []), ("oabn", ["model.oabn_form: 'median' -> 'branch'",
                                              "model.oabn_tau: 4.0 -> 3.0"])):
    old.model.norm = new.model.norm = norm
    assert workdir_lib._changes(
        workdir_lib.fingerprint(config_lib.resolve(old), "fp"),
        workdir_lib.fingerprint(config_lib.resolve(new), "fp")) == changed


def test_discard_stale_moves_stages_aside_and_trains_them_again(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path)
  old_packed = open(os.path.join(workdir, "model.packed"), "rb").read()
  metrics_before = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
  cfg = tiny.tiny_config()
  cfg.fp.num_steps = 6
  report = train_and_evaluate(cfg, workdir, discard_stale=True)
  (aside,) = glob.glob(os.path.join(workdir, "stale", "*"))
  assert sorted(os.listdir(aside)) == ["fp", "fp.json", "qat", "qat.json"]
  assert StageCheckpoints(os.path.join(aside, "fp"), keep=2).latest_step() == 4
  fp = StageCheckpoints(os.path.join(workdir, "checkpoints", "fp"), keep=2)
  assert fp.latest_step() == 6
  # QAT trained again, from the new FP stage: new rows, a new export, the new config.
  new_rows = open(os.path.join(workdir, "metrics.jsonl")).read()[metrics_before:]
  assert "qat/loss" in new_rows
  assert open(os.path.join(workdir, "model.packed"), "rb").read() != old_packed
  with open(os.path.join(workdir, "checkpoints", "qat.json")) as f:
    assert json.load(f)["config"]["fp.num_steps"] == 6
  assert report["config"]["fp"]["num_steps"] == 6


def test_other_model_in_the_workdir_is_refused_in_a_few_lines(tiny_run):
  # The bug: up to 542 lines of orbax errors, never saying "another model".
  env = subprocess_env()
  out = subprocess.run(
      [sys.executable, "launch/main.py", f"--config={ROOT}/configs/tiny.py",
       f"--workdir={tiny_run[0]}", "--config.model.norm=bn"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) <= 10, out.stderr
  assert "model.norm: 'oabn' -> 'bn'" in out.stderr
  assert "Traceback" not in out.stderr and "orbax" not in out.stderr.lower()


# ----------------------------------------------------------------------------- checkpoints

def _two_steps(directory):
  ckpt = StageCheckpoints(directory, keep=3)
  rng = np.random.default_rng(0)
  for s in (1, 2):
    ckpt.save(s, {"w": rng.standard_normal(5000).astype(np.float32) + s}, {"pos": s})
  ckpt.close()


def _truncate_data_file(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                recursive=True)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  directory = str(tmp_path / "fp")
  _two_steps(directory)
  _truncate_data_file(os.path.join(directory, "2"))
  ckpt = StageCheckpoints(directory, keep=3)
  state, data_state, _ = ckpt.restore({"w": np.zeros(5000, np.float32)})
  assert data_state == {"pos": 1} and ckpt.latest_step() == 1
  assert abs(float(np.mean(state["w"])) - 1) < 0.1
  # Kept, not deleted, and named in the warning.
  aside = str(tmp_path / "fp.unreadable" / "2")
  assert os.path.isdir(aside) and os.path.join(directory, "2") in caplog.text
  assert aside in caplog.text
  # Training goes on: step 2 can be saved again.
  ckpt.save(2, {"w": np.ones(5000, np.float32)}, {"pos": 2})
  ckpt.wait()
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_when_no_checkpoint_is_readable_nothing_is_moved(tmp_path):
  directory = str(tmp_path / "fp")
  _two_steps(directory)
  for s in ("1", "2"):
    _truncate_data_file(os.path.join(directory, s))
  ckpt = StageCheckpoints(directory, keep=3)
  with pytest.raises(ValueError):
    ckpt.restore({"w": np.zeros(5000, np.float32)})
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert not os.path.exists(directory + ".unreadable")


@pytest.mark.parametrize("name", ["no/such/dir", "missing.msgpack", "missing.npz"])
def test_init_from_a_missing_path_creates_nothing(tmp_path, name):
  path = str(tmp_path / name)
  with pytest.raises(FileNotFoundError, match="init_from="):
    checkpoint.load_variables(path, {})
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- bookkeeping

def test_output_files_have_the_ordinary_mode(tiny_run):
  umask = os.umask(0)
  os.umask(umask)
  for name in ("report.json", "report.md", "model.packed", "accuracy.png",
               "weight_histograms.png", "metrics.jsonl", "checkpoints/fp.json"):
    mode = stat.S_IMODE(os.stat(os.path.join(tiny_run[0], name)).st_mode)
    assert mode == 0o666 & ~umask, (name, oct(mode))


def test_atomic_write_gives_0644_under_umask_022(tmp_path):
  umask = os.umask(0o022)
  try:
    atomic_write_text(tmp_path / "a.txt", "x")
  finally:
    os.umask(umask)
  assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644


def test_metrics_have_no_duplicate_steps_after_a_resume(tmp_path):
  cfg = tiny.tiny_config()
  cfg.fp.num_steps, cfg.fp.checkpoint_every = 6, 2
  mesh = sharding.make_mesh()
  loader = data.make_loader(cfg.data, "train", global_batch_size=16, train=True)
  model = build_model(cfg.model, loader.num_classes, deploy=False)
  writer = MetricWriter(str(tmp_path))
  writer.start_stage("qat", 0)
  writer.write_scalars(5, {"qat/loss": 1.0})  # Another stage's row stays.

  def stage(loader):
    state = create_train_state(model, init_variables(model, (16, 16, 3), 0), cfg.fp)
    train_stage("fp", state, train_step=steps.make_train_step(mesh, 10), loader=loader,
                mesh=mesh, ckpt_dir=str(tmp_path / "fp"), **schedule(cfg.fp), writer=writer,
                log_every=1)

  with pytest.raises(KeyboardInterrupt):
    stage(killed_after(loader, 3))  # Steps 1-3 logged, the checkpoint holds step 2.
  stage(loader)
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  fp_steps = [r["step"] for r in rows if "fp/loss" in r]
  assert fp_steps == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if "qat/loss" in r] == [5]
  # TensorBoard's events likewise, as TensorBoard reads them: every step once, the
  # other stage's kept.
  assert _tensorboard_steps(tmp_path, "fp", "fp/loss") == [1, 2, 3, 4, 5, 6]
  assert _tensorboard_steps(tmp_path, "qat", "qat/loss") == [5]


def _tensorboard_steps(workdir, stage, tag):
  """The steps of ``tag`` that TensorBoard shows for ``stage``'s run (purges applied)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(tensorboard_dir(str(workdir), stage))
  acc.Reload()
  return [e.step for e in acc.Scalars(tag)]


def test_a_resumed_stage_purges_its_later_events_and_keeps_the_others(tmp_path, monkeypatch):
  # tensorboardX names event files by the second: all of these open in the same one.
  monkeypatch.setattr(time, "time", lambda: 1.7e9)
  writer = MetricWriter(str(tmp_path))
  writer.start_stage("fp", 0)
  for step in (1, 2, 3):
    writer.write_scalars(step, {"fp/loss": 1.0 / step})
  writer.start_stage("qat", 0)
  writer.write_scalars(1, {"qat/loss": 1.0})
  writer.start_stage("fp", 1)  # fp resumed from its checkpoint at step 1
  writer.write_scalars(2, {"fp/loss": 0.25})
  writer.close()
  assert len(event_files(tensorboard_dir(str(tmp_path), "fp"))) == 2
  assert _tensorboard_steps(tmp_path, "fp", "fp/loss") == [1, 2]
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(tensorboard_dir(str(tmp_path), "fp"))
  acc.Reload()
  assert [e.value for e in acc.Scalars("fp/loss")] == [1.0, 0.25]
  assert _tensorboard_steps(tmp_path, "qat", "qat/loss") == [1]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r.get("fp/loss")) for r in rows] == [(1, 1.0), (1, None), (2, 0.25)]


def test_stage_seconds_are_summed_over_invocations(tmp_path, monkeypatch):
  clock = iter([100.0, 102.0, 200.0, 203.5, 300.0, 301.0]).__next__
  monkeypatch.setattr(workdir_lib.time, "time", clock)
  cfg = tiny.tiny_config()
  for expected in (2.0, 5.5):
    stages = workdir_lib.Stages(str(tmp_path), cfg, ("fp",))
    stages.start("fp")
    assert stages.stop("fp") == expected
  cfg.fp.num_steps = 8  # Another config starts from zero (its checkpoints are another run's).
  shutil.rmtree(tmp_path / "checkpoints" / "fp", ignore_errors=True)
  stages = workdir_lib.Stages(str(tmp_path), cfg, ("fp",))
  stages.start("fp")
  assert stages.stop("fp") == 1.0


def test_report_seconds_include_earlier_invocations(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path)
  first = tiny_run[1]["seconds"]
  os.remove(os.path.join(workdir, "report.json"))  # else the finished run is not run again
  again = train_and_evaluate(tiny.tiny_config(), workdir)["seconds"]
  assert again["fp"] > first["fp"] and again["qat"] > first["qat"]

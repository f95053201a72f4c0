"""launch/main.py as a user meets it: config mistakes in a line or two, --help, short runs of
long recipes, and an image folder trained end to end."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from repvgg_jax.train import config as config_lib
from repvgg_jax.train.checkpoint import StageCheckpoints

from _util import ROOT, deployed_accuracy, subprocess_env
from configs import demo


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, "launch/main.py", *args], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override, names, nearest", [
    ("--config.fp.num_stpes=3", ["--config.fp.num_stpes=3"], "fp.num_steps"),
    ("--config.fpp.num_steps=3", ["--config.fpp.num_steps=3"], "fp"),
    ("--config.fp.num_steps=abc", ["--config.fp.num_steps=abc"], None),
    ("--config.quant.method=kmeans", ["quant.method='kmeans'", "'cluster'"], None),
])
def test_config_mistakes_are_one_or_two_lines_naming_the_field(override, names, nearest,
                                                               tmp_path):
  out = _main("--config=configs/tiny.py", f"--workdir={tmp_path}", override)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert 1 <= len(lines) <= 2, out.stderr
  assert lines[0].startswith("error: ") and all(n in lines[0] for n in names), lines[0]
  # The nearest field, as a word of its own ("fp" is in "fpp" too).
  assert nearest is None or nearest in re.findall(r"[\w.]+", lines[0]), lines[0]
  assert "Traceback" not in out.stderr and "\\n" not in out.stderr


def test_verbose_shows_the_traceback(tmp_path):
  out = _main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--verbose",
              "--config.fp.num_stpes=3")
  assert out.returncode != 0 and "Traceback" in out.stderr


def test_missing_config_file_is_named_as_such(tmp_path):
  out = _main("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [
      out.stderr.strip().splitlines()[0]]  # one line
  assert "configs/nope.py" in out.stderr
  assert "configs/demo.py" in out.stderr and "config_config" not in out.stderr


def test_a_missing_data_dir_is_named_and_leaves_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  out = _main("--config=configs/folder.py", f"--config.data.data_dir={tmp_path / 'nope'}",
              f"--workdir={workdir}")
  assert out.returncode != 0
  assert "data_dir" in out.stderr and str(tmp_path / "nope") in out.stderr
  assert not workdir.exists()


def test_help_lists_the_configs_and_how_to_override_fields():
  out = _main("--help")
  assert out.returncode == 0, out.stderr  # asking for help is no error (absl exits 1)
  for name in os.listdir(os.path.join(ROOT, "configs")):
    if name.endswith(".py"):
      assert f"configs/{name}" in out.stdout
  assert "--config.<group>.<field>=VALUE" in out.stdout and "--discard_stale" in out.stdout


def test_short_run_of_a_long_recipe_shortens_the_warmup(caplog):
  # The bug: --config.fp.num_steps=50 with the demo failed on warmup_steps=100.
  cfg = demo.get_config()
  cfg.fp.num_steps = 50
  resolved = config_lib.resolve(cfg)
  assert resolved.fp.warmup_steps == 5 and cfg.fp.warmup_steps == 100
  assert "fp.warmup_steps=100" in caplog.text and "fp.num_steps=50" in caplog.text
  assert resolved.qat.warmup_steps == 0


def test_unknown_field_in_python_names_the_nearest():
  cfg = demo.get_config()
  cfg.unlock()  # A config built in Python, unlocked: a typo can get in.
  cfg.fp.warmup_step = 3
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  # The field and the nearest one, each a word of its own.
  assert {"fp.warmup_step", "fp.warmup_steps"} <= set(re.findall(r"[\w.]+", str(e.value)))


def test_image_folder_trains_end_to_end_and_the_report_names_its_classes(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 8), ("val", 4)):
    for k, name in enumerate(("tulip", "daisy", "rose")):
      os.makedirs(tmp_path / "flowers" / split / name)
      for i in range(n):
        colour = np.zeros(3)
        colour[k] = 200
        arr = (colour + rng.integers(0, 50, (20, 20, 3))).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "flowers" / split / name /
                                  f"{i}.{'png' if i % 2 else 'jpg'}")
  workdir = tmp_path / "run"
  out = _main("--config=configs/folder.py", f"--config.data.data_dir={tmp_path / 'flowers'}",
              f"--workdir={workdir}", "--config.model.blocks=(1,1,1,1)",
              "--config.model.widths=(0.25,0.25,0.25,0.25)",
              "--config.data.image_size=16", "--config.fp.num_steps=4",
              "--config.qat.num_steps=2", "--config.fp.batch_size=8",
              "--config.qat.batch_size=8", "--config.eval_batch_size=8",
              "--config.quant.refit_every=2",
              "--config.export.coreml=off",  # tests/train/test_pipeline.py exports Core ML
              timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / "report.json") as f:
    report = json.load(f)
  assert report["data"] == {"name": "flowers", "num_classes": 3,
                            "classes": ["daisy", "rose", "tulip"]}
  assert report["forms"]["packed"]["accuracy"] == deployed_accuracy(str(workdir))
  assert report["config"]["fp"]["warmup_steps"] == 0  # 100 does not fit 4 steps
  assert "Dataset: flowers, 3 classes (daisy, rose, tulip)" in open(workdir / "report.md").read()
  assert os.path.exists(workdir / "data_stats.json")
  # orbax's INFO lines stay out of the log unless --verbose.
  assert "orbax" not in out.stderr


def _interrupt_once_training(args, wait_for):
  """Runs launch/main.py, sends Ctrl-C (SIGINT) once a stderr line holds ``wait_for``;
  returns (exit status, that line, stderr after it)."""
  proc = subprocess.Popen([sys.executable, "launch/main.py", *args], cwd=ROOT,
                          env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  try:
    for seen in proc.stderr:
      if wait_for in seen:
        break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=300)[1]
  finally:
    proc.kill()
  return proc.returncode, seen, rest


def test_ctrl_c_saves_the_step_in_one_line_exits_130_and_the_rerun_resumes_there(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.log_every=1",
          "--config.fp.num_steps=100000", "--config.fp.checkpoint_every=100000"]
  code, _, rest = _interrupt_once_training(args, "fp: step 3/")
  assert code == 130, rest
  said = [line for line in rest.splitlines() if "interrupted" in line]
  assert len(said) == 1 and said[0].startswith("fp: ") and "rerun" in said[0], rest
  assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
  step = int(re.search(r"step (\d+)", said[0]).group(1))
  assert step >= 3
  fp = StageCheckpoints(str(workdir / "checkpoints" / "fp"), keep=1, create=False)
  assert fp.latest_step() == step

  code, resumed, _ = _interrupt_once_training(args, "fp: resumed from step")
  assert code == 130 and f"fp: resumed from step {step} " in resumed

"""The local smoke mode of the real ImageNet config, end to end through launch/main.py.

``configs/imagenet_w4.py:local`` writes a tiny synthetic imagenet2012 in tfds
ArrayRecord form (JPEG records) and runs every stage on it: the same input path,
trainer and export as the real job.
"""

import json
import os
import subprocess
import sys

from _util import ROOT, deployed_accuracy, subprocess_env


def test_imagenet_w4_local_runs_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"),
                      "--config", os.path.join(ROOT, "configs", "imagenet_w4.py") + ":local",
                      "--workdir", workdir,
                      # The mode's path at a quarter of its JPEGs and widths; Core ML's
                      # export is tests/train/test_pipeline.py's.
                      "--config.data.local_examples=64",
                      "--config.model.widths=(0.25,0.25,0.25,0.25)", "--config.export.coreml=off"],
                     env=subprocess_env(), cwd=ROOT, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert all("accuracy" in report["forms"][form] for form in ("fp", "merged", "qat"))
  assert report["forms"]["packed"]["accuracy"] == deployed_accuracy(workdir)
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("fp/eval_accuracy" in m for m in metrics)
  assert any("qat/best_eval_accuracy" in m for m in metrics)
  # It read the tfds ArrayRecord dataset it wrote, as a real run reads ImageNet.
  version_dirs = os.listdir(os.path.join(workdir, "local_tfds", "imagenet2012"))
  files = os.listdir(os.path.join(workdir, "local_tfds", "imagenet2012", version_dirs[0]))
  assert any(".array_record" in f for f in files)
  # Library INFO lines (orbax logs each save) are dropped; ours stay.
  assert "fp: step 20/20" in r.stderr and "checkpoint_manager.py:" not in r.stderr


_WRITE_WITHOUT_TF = """
import sys

class Hidden:  # as on a machine without TensorFlow: no finder finds it
  def __init__(self, finder):
    self.finder = finder
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return None
    return self.finder.find_spec(name, path, target)
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
import importlib.util
assert importlib.util.find_spec("tensorflow") is None
import numpy as np, types
from repvgg_jax import data
from repvgg_jax.data.local_tfds import ensure_local_imagenet
d = ensure_local_imagenet(sys.argv[1], train=8, validation=4)
cfg = types.SimpleNamespace(source="tfds", name="imagenet2012", data_dir=d, image_size=32,
                            augment="rrc_flip")
b = next(iter(data.make_loader(cfg, "train", global_batch_size=4, train=True,
                               process_index=0, process_count=1)))
assert b["image"].dtype == np.uint8 and b["image"].shape == (4, 32, 32, 3)
print("labels", sorted(int(x) for x in b["label"]))
"""


def test_local_dataset_is_written_and_read_without_tensorflow(tmp_path):
  r = subprocess.run([sys.executable, "-c", _WRITE_WITHOUT_TF, str(tmp_path / "tfds")],
                     env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  labels = [int(x) for x in r.stdout.split("labels", 1)[1].strip(" []\n").split(",")]
  assert len(labels) == 4 and all(0 <= x < 10 for x in labels)

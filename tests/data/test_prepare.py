"""docs/data.md's ImageNet steps, followed literally on tiny archive-shaped tars.

Building a tfds dataset needs TensorFlow (the ``[prepare]`` extra); the test is
skipped, with that reason, where it is not installed. Reading and training need
no TensorFlow.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from _util import ROOT, subprocess_env

SYNSETS = ("n01440764", "n01443537")  # The first two of tfds' imagenet2012 labels.txt.

needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="building tfds datasets needs TensorFlow: pip install -e '.[prepare]'")


def _jpeg(rng):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def _archives(manual_dir, per_class=4, val=4):
  """ILSVRC2012_img_train.tar (one tar of JPEGs per synset) and ILSVRC2012_img_val.tar."""
  rng = np.random.default_rng(0)
  os.makedirs(manual_dir)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for synset in SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as t:
        for i in range(per_class):
          _add(t, f"{synset}_{i}.JPEG", _jpeg(rng))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as v:
    for i in range(1, val + 1):
      _add(v, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng))


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                        text=True, timeout=timeout)


@needs_tensorflow
def test_imagenet_steps_of_the_docs_give_data_the_imagenet_config_trains_on(tmp_path):
  manual, data_dir, workdir = tmp_path / "archives", tmp_path / "tfds", tmp_path / "run"
  _archives(str(manual))
  out = _run("-m", "repvgg_jax.data.prepare", "imagenet2012", f"--manual_dir={manual}",
             f"--data_dir={data_dir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"--config.data.data_dir={data_dir}" in out.stdout
  (version,) = os.listdir(data_dir / "imagenet2012")
  files = sorted(os.listdir(data_dir / "imagenet2012" / version))
  assert "imagenet2012-train.array_record-00000-of-00001" in files
  assert "imagenet2012-validation.array_record-00000-of-00001" in files

  out = _run("launch/main.py", "--config=configs/imagenet_fp.py",
             f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
             "--config.model.blocks=(1,1,1,1)", "--config.model.widths=(0.25,0.25,0.25,0.25)", "--config.data.image_size=16",
             "--config.data.worker_count=0", "--config.fp.num_steps=2",
             "--config.fp.batch_size=4", "--config.eval_batch_size=4")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / "report.json") as f:
    report = json.load(f)
  assert report["data"]["name"] == "imagenet2012" and report["data"]["num_classes"] == 1000
  assert report["data"]["classes"][:2] == list(SYNSETS)


def test_prepare_names_the_missing_archives(tmp_path):
  out = _run("-m", "repvgg_jax.data.prepare", "imagenet2012", f"--manual_dir={tmp_path}",
             f"--data_dir={tmp_path / 'tfds'}", timeout=120)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  for name in ("imagenet2012", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
               "--manual_dir", str(tmp_path), "https://image-net.org/download-images"):
    assert name in lines[0], (name, lines[0])
  assert not os.path.exists(tmp_path / "tfds")

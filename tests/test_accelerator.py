"""benchmarks/accelerator.py at a tiny size on CPU, where ml_collections, tfds and grain are absent.

The accelerator images it is written for have jax, flax and optax but none of
those three; the run blocks their import, so a dependency on them (direct or
through ``repvgg_jax``'s imports) fails here.
"""

import json
import os
import subprocess
import sys

from _util import ROOT, subprocess_env

BLOCKED = ("ml_collections", "tensorflow_datasets", "grain", "tensorflow")

_RUN = """
import runpy, sys

class Hidden:  # the blocked packages are not found, as if not installed
  def __init__(self, finder):
    self.finder = finder
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {blocked!r}:
      return None
    return self.finder.find_spec(name, path, target)
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
sys.argv = ["accelerator.py", "--tiny", "--torch", "none", "--json", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_tiny_run_without_ml_collections_tfds_grain(tmp_path):
  out = str(tmp_path / "acc.json")
  env = subprocess_env()
  code = _RUN.format(blocked=BLOCKED, out=out,
                     script=os.path.join(ROOT, "benchmarks", "accelerator.py"))
  r = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.load(open(out))
  rows = result["rows"]
  assert set(rows) == {"train form FP", "deploy FP", "deploy ClusterQAT 4-bit",
                       "deploy inference"}
  for row in rows.values():
    assert row["s_per_step"] > 0
  assert result["meta"]["platform"] == "cpu" and result["timm"].startswith("not run")
  ratio, goal = result["ratios"]["ClusterQAT step / FP step (deploy form)"]
  assert goal == "<= 1.05" and ratio > 0
  assert "| deploy ClusterQAT 4-bit |" in r.stdout  # the Markdown table


def test_peak_table_matches_device_kinds():
  from benchmarks import accelerator
  assert accelerator.peak_tflops("NVIDIA H200") == 989.0
  assert accelerator.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert accelerator.peak_tflops("TPU v5 lite") == 197.0
  assert accelerator.peak_tflops("cpu") is None

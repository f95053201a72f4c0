"""experiments/stock_tools.py: the LUT decode, the page from a ledger, and the smoke run."""

import json
import os
import subprocess
import sys

import numpy as np

from experiments import stock_tools

from _util import ROOT, subprocess_env


def test_decode_lut_is_one_palette_per_output_channel_or_group():
  rng = np.random.default_rng(0)
  idx = rng.integers(0, 4, (6, 5, 3, 3)).astype(np.uint8)
  lut = rng.standard_normal((6, 1, 1, 1, 4, 1))
  dense = stock_tools.decode_lut(idx, lut)
  for o in range(6):
    np.testing.assert_array_equal(dense[o], lut[o, 0, 0, 0, :, 0][idx[o]])
  grouped = rng.standard_normal((3, 1, 4, 1))  # a dense layer, one palette per 2 rows
  idx2 = rng.integers(0, 4, (6, 7))
  dense2 = stock_tools.decode_lut(idx2, grouped)
  for o in range(6):
    np.testing.assert_array_equal(dense2[o], grouped[o // 2, 0, :, 0][idx2[o]])


def _ledger():
  def row(seed, method, acc, **details):
    tool, bits, act = stock_tools.METHODS[method]
    return {"run": f"net/seed{seed}", "method": method, "tool": tool, "weight_bits": bits,
            "act_bits": act, "accuracy": acc, "details": details, "seconds": 1.0,
            "command": "python -m experiments.stock_tools --smoke", "commit": "abc1234",
            "machine": {"date": "2026-12-07T00:00:00", "nproc": 1, "cpu": "CPU",
                        "jax": "0.0"}}
  ort = {"kernel_types": {"stem": "INT8", "b": "INT4", "head": "INT8"},
         "qdq_domains": ["com.microsoft"], "block_int_range": [-8, 7],
         "block_levels_per_channel_max": 16, "optimized_ops": {"Conv": 2, "QLinearConv": 1},
         "calib_images": 512}
  cml = {"levels_per_channel_max": {"stem": 27, "b": 4, "head": 256},
         "rel_rms_error": {"stem": 0.0, "b": 0.3, "head": 0.01},
         "max_abs_vs_coremltools": 0.0, "stem_head": ["stem", "head"]}
  rows, runs = {}, {}
  for seed, (f, o, c, p) in enumerate([(0.90, 0.89, 0.80, 0.10), (0.92, 0.91, 0.84, 0.20)]):
    for method, acc, d in (("float", f, {}), ("ort_qint4", o, ort), ("coreml_w2", c, cml),
                           ("ptq_w2a8", p, {})):
      rows[f"net/seed{seed}/{method}"] = row(seed, method, acc, **d)
    runs[f"net/seed{seed}"] = {
        "workdir": f"runs/seed{seed}", "seed": seed, "net": "net", "title": "A net",
        "test_images": 10000, "report": {"merged": f, "ptq": p, "packed": 0.88},
        "report_bits": 2, "clusterqat": {"2": {"qat": 0.88, "packed": 0.88, "act_bits": 8,
                                               "source": "report.json"}},
        "calib_batches": 16, "qat_batch_size": 64, "first_last_bits": 8}
  return {"runs": runs, "rows": rows}


def test_page_is_mean_and_std_over_seeds_with_the_checks():
  page = stock_tools.markdown(_ledger())
  assert "## A net" in page
  assert "Float (merged network): 91.00 ± 1.41." in page
  ort = next(ln for ln in page.splitlines() if ln.startswith("| ONNX Runtime"))
  assert ort.split(" | ")[2:4] == ["90.00 ± 1.41", "–"]  # W4, W3
  cml = next(ln for ln in page.splitlines() if ln.startswith("| coremltools"))
  assert cml.rstrip(" |").endswith("82.00 ± 2.83")
  assert "| ours: ClusterQAT, packed file (the run's report) | – | – | – | 88.00 ± 0.00 |" in page
  assert "| `coreml_w2` | 80.00 | 84.00 |" in page
  assert "`merged`: 90.00, 92.00 (the same here)" in page
  assert "`ptq`: 10.00, 20.00 (the same here)" in page
  assert "at most 4 values a channel (2^2 = 4)" in page
  assert "integers in [-8, 7], at most 16 a channel" in page
  assert "first 512 training images" in page


def test_smoke_run_writes_ledger_and_page(tmp_path):
  workdir = str(tmp_path / "w")
  cmd = [sys.executable, "-m", "experiments.stock_tools", "--workdir", workdir, "--smoke"]
  subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
  ledger = json.load(open(os.path.join(workdir, "stock_tools_rows.json")))
  methods = sorted(r["method"] for r in ledger["rows"].values())
  assert methods == sorted(stock_tools.SMOKE_METHODS)
  for r in ledger["rows"].values():
    assert 0 <= r["accuracy"] <= 1
    if r["tool"] == "coreml":
      d = r["details"]
      assert d["max_abs_vs_coremltools"] == 0.0
      assert max(n for k, n in d["levels_per_channel_max"].items()
                 if k not in d["stem_head"]) <= 2 ** r["weight_bits"]
    if r["method"] == "ort_qint4":
      assert sorted(set(r["details"]["kernel_types"].values())) == ["INT4", "INT8"]
  page = open(os.path.join(workdir, "stock_tools.md")).read()
  assert "| `coreml_w2` |" in page
  # The page is written from the ledger alone.
  os.remove(os.path.join(workdir, "stock_tools.md"))
  subprocess.run(cmd + ["--report_only"], cwd=ROOT, env=subprocess_env(), check=True,
                 capture_output=True)
  assert open(os.path.join(workdir, "stock_tools.md")).read() == page

"""End to end on tiny synthetic data: FP -> merge -> ClusterQAT -> packed export -> report.

The whole trainer runs once per test process (``tiny_run`` in conftest.py); its wall time is
reported by ``pytest --durations`` rather than asserted, since a timed test
fails on a loaded machine for no fault of the code.
"""

import json
import logging
import os
import re

import jax
import numpy as np
import pytest

import repvgg_jax
from repvgg_jax.train import config as config_lib, export, report as report_lib
from repvgg_jax.train import train as train_module
from repvgg_jax.train.train import train_and_evaluate
from repvgg_jax.train.writers import event_files, tensorboard_dir

from _util import copy_run, deployed_accuracy, raises_naming
from configs import tiny


def test_report_json_has_every_form(tiny_run):
  workdir, _ = tiny_run
  with open(os.path.join(workdir, "report.json")) as f:
    forms = json.load(f)["forms"]
  assert all("accuracy" in forms[form] for form in ("fp", "merged", "qat", "packed"))
  assert forms["packed"]["accuracy"] == deployed_accuracy(workdir)
  assert 0 < forms["packed"]["size_bytes"] < forms["merged"]["size_bytes"]


def test_stock_baseline_row_is_uniform_ptq_of_the_merged_network(tiny_run):
  """The report's stock-PTQ row, rebuilt here from the public API: the merged FP
  checkpoint, uniform per-channel weights with the MSE step at the run's bits, activation
  steps calibrated on the first training batches, no training; evaluated on the test split."""
  from repvgg_jax import data
  from repvgg_jax.quant import make_quantizer
  from repvgg_jax.train import steps
  from repvgg_jax.train.checkpoint import import_variables
  from repvgg_jax.train.state import build_model, init_variables
  workdir, report = tiny_run
  cfg, forms = tiny.tiny_config(), report["forms"]
  assert [forms["ptq"][k] for k in ("weight_bits", "act_bits")] == \
      [forms["qat"][k] for k in ("weight_bits", "act_bits")]
  test = data.make_loader(cfg.data, "test", global_batch_size=cfg.eval_batch_size,
                          train=False, seed=cfg.seed, cache_dir=workdir)
  model = build_model(cfg.model, test.num_classes, deploy=False)
  fp = import_variables(os.path.join(workdir, "checkpoints", "fp"), model,
                        init_variables(model, test.image_shape, cfg.seed))
  params = repvgg_jax.merge(fp)["params"]
  q = make_quantizer("uniform", bits=cfg.quant.bits, clipping="mse",
                     first_last_bits=cfg.quant.first_last_bits)
  quant = q.init(params)
  qmodel = build_model(cfg.model, test.num_classes, deploy=True, act_bits=cfg.quant.act_bits)
  if cfg.quant.act_bits:
    calib = data.make_loader(cfg.data, "train", global_batch_size=cfg.qat.batch_size,
                             train=False, seed=cfg.seed, cache_dir=workdir)
    batches = [steps.model_input(b["image"], calib.pixel_stats) for b in calib]
    quant = repvgg_jax.calibrate(qmodel, {"params": q.apply(params, quant), "quant": quant},
                                 batches[:cfg.quant.calib_batches],
                                 method=cfg.quant.act_calibration)
  variables = {"params": q.apply(params, quant), "quant": quant}
  correct = 0
  for b in test:
    logits = qmodel.apply(variables, steps.model_input(b["image"], test.pixel_stats))
    correct += int(((np.asarray(logits).argmax(-1) == np.asarray(b["label"]))
                    & np.asarray(b["mask"]).astype(bool)).sum())
  assert forms["ptq"]["accuracy"] == correct / test.num_examples
  assert f"| stock PTQ: uniform per-channel, no QAT | W4A{cfg.quant.act_bits or 32} |" in \
      open(os.path.join(workdir, "report.md")).read()


def test_merge_keeps_train_form_accuracy(tiny_run):
  forms = tiny_run[1]["forms"]
  assert abs(forms["fp"]["accuracy"] - forms["merged"]["accuracy"]) <= 1 / 64


def test_workdir_has_report_figures_and_export(tiny_run):
  workdir = tiny_run[0]
  for name in ("report.md", "weight_histograms.png", "accuracy.png", "model.packed"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert "packed export" in open(os.path.join(workdir, "report.md")).read()
  for stage in ("fp", "qat"):
    events = event_files(tensorboard_dir(workdir, stage))
    assert events and os.path.getsize(events[0]) > 0


def test_report_has_the_merged_fp_models_channel_outliers(tiny_run):
  workdir = tiny_run[0]
  s = json.load(open(os.path.join(workdir, "report.json")))["channel_outliers"]
  assert s["worst_ratio"] >= s["worst_ratio_3x3"] > 1
  assert s["worst_branch"] in ("3x3", "1x1", "identity")
  assert sum(s["branch_counts"].values()) == s["channels"]
  md = open(os.path.join(workdir, "report.md")).read()
  assert f"worst {s['worst_ratio']:.1f} in {s['worst_layer']} channel {s['worst_channel']}" in md
  assert os.path.getsize(os.path.join(workdir, "channel_outliers.png")) > 0


def test_rerun_resumes_finished_stages_without_training(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path)
  before = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
  cfg = tiny.tiny_config()
  cfg.quant.method = "none"
  train_and_evaluate(cfg, workdir)
  # Both stages restore step num_steps and run no step, so no new train metrics.
  lines = open(os.path.join(workdir, "metrics.jsonl")).read()[before:]
  assert "fp/loss" not in lines


def test_qat_starts_from_an_fp_checkpoint_directory(tiny_run, tmp_path):
  cfg = tiny.tiny_config()
  cfg.init_from = os.path.join(tiny_run[0], "checkpoints", "fp")
  report = train_and_evaluate(cfg, str(tmp_path))
  assert report["forms"]["fp"]["accuracy"] == tiny_run[1]["forms"]["fp"]["accuracy"]
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints", "fp"))


def test_eval_fp_forms_false_skips_fp_and_merged_accuracy(tiny_run, tmp_path):
  cfg = tiny.tiny_config()
  cfg.init_from = os.path.join(tiny_run[0], "checkpoints", "fp")
  cfg.eval_fp_forms = False
  cfg.qat.enabled = False
  forms = train_and_evaluate(cfg, str(tmp_path))["forms"]
  assert "fp" not in forms and "accuracy" not in forms["merged"]
  assert forms["merged"]["size_bytes"] == tiny_run[1]["forms"]["merged"]["size_bytes"]
  assert forms["packed"]["accuracy"] == deployed_accuracy(str(tmp_path))
  assert "| merged FP | W32A32 | not evaluated |" in open(os.path.join(tmp_path, "report.md")).read()


def test_w4a8_cluster_qat_reports_stablehlo_and_integer_forms(tiny_run, tmp_path):
  cfg = tiny.tiny_config()
  cfg.init_from = os.path.join(tiny_run[0], "checkpoints", "fp")
  cfg.eval_fp_forms = False
  cfg.quant.act_bits, cfg.quant.int8_levels = 8, True
  forms = train_and_evaluate(cfg, str(tmp_path))["forms"]
  assert forms["stablehlo"]["accuracy"] == forms["packed"]["accuracy"]
  assert forms["packed"]["weight_bits"] == 4 and forms["stablehlo"]["act_bits"] == 8
  packed_bytes = os.path.getsize(os.path.join(tmp_path, "model.packed"))
  assert forms["stablehlo"]["size_bytes"] == os.path.getsize(os.path.join(tmp_path,
                                                                           "model.stablehlo"))
  assert forms["stablehlo"]["size_bytes"] <= 1.25 * packed_bytes
  assert forms["integer"]["accuracy"] == deployed_accuracy(str(tmp_path), "integer")
  assert forms["integer"]["agreement"] > 0.9
  assert "| model.stablehlo | W4A8 |" in open(os.path.join(tmp_path, "report.md")).read()


def test_w8a8_ptq_from_the_command_line_config(tiny_run, tmp_path):
  cfg = tiny.tiny_config()
  cfg.init_from = os.path.join(tiny_run[0], "checkpoints", "fp")
  cfg.eval_fp_forms, cfg.qat.enabled = False, False
  cfg.quant.method, cfg.quant.bits, cfg.quant.clipping = "uniform", 8, "mse"
  cfg.quant.act_bits, cfg.quant.act_calibration = 8, "mse"
  forms = train_and_evaluate(cfg, str(tmp_path))["forms"]
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "qat"))  # no training
  assert forms["qat"]["accuracy"] == forms["packed"]["accuracy"] == forms["stablehlo"]["accuracy"]
  assert "integer" in forms  # uniform grids are int8 grids


def test_the_packed_file_describes_its_model(tiny_run):
  deployed = repvgg_jax.load_packed(os.path.join(tiny_run[0], "model.packed"))
  m = deployed.model
  assert m["variant"] == "RepVGG-A0" and m["num_classes"] == 10 and m["image_size"] == 16
  assert m["blocks"] == [1, 1, 1, 1] and m["widths"] == [0.25] * 4
  assert m["cifar_stem"] and m["act_bits"] == 0 and len(m["mean"]) == len(m["std"]) == 3


def test_onnx_coreml_and_static_batch_stablehlo_exports(tiny_run, tmp_path):
  pytest.importorskip("onnxruntime")
  pytest.importorskip("coremltools")
  cfg = tiny.tiny_config()
  cfg.init_from = os.path.join(tiny_run[0], "checkpoints", "fp")
  cfg.eval_fp_forms = False
  cfg.quant.act_bits, cfg.quant.int8_levels = 7, True
  cfg.export.onnx, cfg.export.onnx_activations, cfg.export.stablehlo_batch = "on", "int8", 5
  cfg.export.coreml = "on"
  forms = train_and_evaluate(cfg, str(tmp_path))["forms"]
  package = os.path.join(tmp_path, "model.mlpackage")
  assert forms["coreml"]["size_bytes"] == sum(
      os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(package) for f in fs) > 0
  assert "accuracy" not in forms["coreml"]
  onnx_path = os.path.join(tmp_path, "model.onnx")
  assert forms["onnx"]["size_bytes"] == os.path.getsize(onnx_path)
  assert forms["onnx"]["agreement"] >= 0.99  # ONNX Runtime vs the integer forward
  assert abs(forms["onnx"]["accuracy"] - forms["integer"]["accuracy"]) <= 0.01
  assert forms["stablehlo"]["accuracy"] == forms["packed"]["accuracy"]  # in batches of 5
  exported = jax.export.deserialize(open(os.path.join(tmp_path, "model.stablehlo"), "rb").read())
  assert exported.in_avals[0].shape[0] == 5
  report_md = open(os.path.join(tmp_path, "report.md")).read()
  assert "model.onnx in ONNX Runtime | W4A7 |" in report_md
  assert "model.mlpackage (Core ML) | W4A7 | not evaluated |" in report_md
  # The same workdir without ONNX and Core ML: nothing retrains, and the earlier files go.
  cfg.export.onnx = cfg.export.coreml = "off"
  forms = train_and_evaluate(cfg, str(tmp_path))["forms"]
  assert "onnx" not in forms and not os.path.exists(onnx_path)
  assert "coreml" not in forms and not os.path.exists(package)


def test_a_size_budget_allocates_bits_per_layer_and_the_files_keep_them(tiny_run, tmp_path):
  cfg = tiny.tiny_config()
  cfg.init_from = os.path.join(tiny_run[0], "checkpoints", "fp")
  cfg.eval_fp_forms = False
  cfg.quant.budget.avg_bits, cfg.quant.budget.batches = 2.5, 2
  report = train_and_evaluate(cfg, str(tmp_path))
  a = json.load(open(os.path.join(tmp_path, "report.json")))["bit_allocation"]
  assert a["kernel_bytes"] <= a["budget_bytes"]
  assert len({l["bits"] for l in a["layers"].values()}) >= 2, a["layers"]
  packed = repvgg_jax.load_packed(os.path.join(tmp_path, "model.packed"))
  rows = {r["path"]: r for r in packed.packed.report()}
  for path, l in a["layers"].items():
    assert packed.packed.layers[path]["bits"] == l["bits"] and rows[path]["packed_bytes"] == l["bytes"]
  assert sum(r["packed_bytes"] for p, r in rows.items() if p != "total") == a["kernel_bytes"]
  forms = report["forms"]
  assert forms["packed"]["accuracy"] == forms["stablehlo"]["accuracy"] == forms["qat"]["accuracy"]
  assert os.path.getsize(os.path.join(tmp_path, "bits_by_layer.png")) > 0
  assert "| layer | weights | bits | packed bytes |" in open(os.path.join(tmp_path, "report.md")).read()


def test_an_unmeetable_budget_is_refused_before_training(tmp_path):
  cfg = tiny.tiny_config()
  cfg.quant.budget.bytes = 100
  with raises_naming(ValueError, "quant.budget.bytes=100"):
    train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_finished_run_returns_its_report_without_training_or_evaluating(tiny_run, tmp_path,
                                                                          monkeypatch):
  workdir = copy_run(tiny_run, tmp_path)

  def refuse(*args, **kwargs):
    raise AssertionError("a finished run trained, evaluated or exported again")
  for name in ("train_stage", "create_train_state"):
    monkeypatch.setattr(train_module, name, refuse)
  monkeypatch.setattr(export, "evaluate_deployed", refuse)
  monkeypatch.setattr(repvgg_jax, "export_stablehlo", refuse)
  again = train_and_evaluate(tiny.tiny_config(), workdir)
  assert again == json.load(open(os.path.join(workdir, "report.json")))
  assert again["forms"] == tiny_run[1]["forms"]
  # A file the report names gone, or another config: the run's end runs again.
  os.remove(os.path.join(workdir, "model.stablehlo"))
  with pytest.raises(AssertionError, match="again"):
    train_and_evaluate(tiny.tiny_config(), workdir)
  assert report_lib.finished_report(config_lib.resolve(tiny.tiny_config()), workdir) is None


class _Batches:
  """A test split of 3 batches of 2 images (the last one half padding), counting its passes."""

  def __init__(self):
    self.passes = 0

  def __iter__(self):
    self.passes += 1
    for k in range(3):
      yield {"image": np.full((2, 1), k), "label": np.array([k, 0]),
             "mask": np.array([True, k < 2])}


def test_deployed_forms_are_evaluated_one_by_one_with_a_log_line_each(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  loader = _Batches()
  right = lambda x: np.eye(3)[x[:, 0]]  # noqa: E731  predicts the image's k: labels [k, 0]
  wrong = lambda x: np.eye(3)[np.full(len(x), 2)]  # noqa: E731  always 2
  measured = export.evaluate_deployed({"packed": right, "onnx": wrong}, loader)
  # 5 real images; right: k=0 both, k=1 first, k=2 first -> 4/5; wrong: only k=2's 1/5.
  assert measured["packed"] == {"accuracy": 4 / 5, "agreement": 1.0}
  assert measured["onnx"] == {"accuracy": 1 / 5, "agreement": 1 / 5}
  assert loader.passes == 1  # the split fits: the second form replays the first pass
  text = caplog.text
  assert "evaluating packed" in text and "evaluating onnx" in text
  assert re.search(r"packed: top-1 80\.00% on 5 test images, [\d.]+ s", text)
  assert re.search(r"onnx: top-1 20\.00% on 5 test images", text)
  assert text.index("evaluating onnx") > text.index("packed: top-1")


def test_a_split_too_large_to_keep_is_read_again_for_each_form():
  loader = _Batches()
  fn = lambda x: np.eye(3)[x[:, 0]]  # noqa: E731
  measured = export.evaluate_deployed({"a": fn, "b": fn}, loader, keep_bytes=0)
  assert loader.passes == 2 and measured["a"] == measured["b"]


def test_a_launch_validates_its_config_once(tiny_run, tmp_path, monkeypatch):
  calls = []
  validate = config_lib.validate
  monkeypatch.setattr(config_lib, "validate", lambda cfg: calls.append(cfg) or validate(cfg))
  train_and_evaluate(tiny.get_config(), copy_run(tiny_run, tmp_path))  # as launch/main.py
  assert len(calls) == 1

"""OpenVINO runs the trainer's model.onnx: the codebook graph (bit-packed indices decoded
in the graph, float convs) with load_packed's predictions, the int8-grid graph as int8
kernels with the integer forward's; the trainer reports it; without OpenVINO, one line
names the extra."""

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.deploy import openvino as ov_deploy

from _util import raises_naming, tiny_packed, uint8_images


def _openvino():
  pytest.importorskip("onnxruntime")  # the trainer writes model.onnx only with [onnx]
  pytest.importorskip("onnx")
  return pytest.importorskip("openvino")


def _test_images(workdir):
  """The uint8 test images of a run's own data config (report.json), padding dropped."""
  from repvgg_jax import data
  with open(os.path.join(workdir, "report.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f)["config"])
  loader = data.make_loader(cfg.data, "test", global_batch_size=cfg.eval_batch_size,
                            train=False, seed=cfg.seed, cache_dir=workdir)
  return np.concatenate([np.asarray(b["image"])[np.asarray(b["mask"]).astype(bool)]
                         for b in loader])


def _kernel_precisions(fn):
  """``{runtime precision: count}`` of the convolutions and fully connected layers
  OpenVINO compiled."""
  out = {}
  for op in fn.compiled.get_runtime_model().get_ordered_ops():
    info = op.get_rt_info()
    if info["layerType"].astype(str) in ("Convolution", "FullyConnected"):
      p = info["runtimePrecision"].astype(str)
      out[p] = out.get(p, 0) + 1
  return out


@pytest.fixture(scope="module")
def int8_run(tiny_run, tmp_path_factory):
  """The tiny run's FP checkpoint through W4A8 ClusterQAT on an int8 grid."""
  _openvino()
  from configs import tiny
  from repvgg_jax.train.train import train_and_evaluate
  cfg = tiny.tiny_config()
  cfg.init_from = os.path.join(tiny_run[0], "checkpoints", "fp")
  cfg.eval_fp_forms = False
  cfg.quant.act_bits, cfg.quant.int8_levels = 8, True
  workdir = str(tmp_path_factory.mktemp("int8_run"))
  return workdir, train_and_evaluate(cfg, workdir)


def test_openvino_runs_the_codebook_model_onnx_as_load_packed(tiny_run):
  _openvino()
  workdir, report = tiny_run
  assert report["forms"]["packed"].get("act_bits") is None  # W4A32: float activations
  images = _test_images(workdir)
  fn = ov_deploy.onnx_fn(os.path.join(workdir, "model.onnx"))
  got = fn(images)
  want = np.asarray(rv.load_packed(os.path.join(workdir, "model.packed"))(images))
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert set(_kernel_precisions(fn)) == {"f32"}  # the f32 hint, not the CPU's bf16 default
  forms = report["forms"]
  assert forms["openvino"]["accuracy"] == forms["packed"]["accuracy"]
  assert forms["openvino"]["agreement"] == 1.0 and forms["openvino"]["precision"] == "f32"
  report_md = open(os.path.join(workdir, "report.md")).read()
  assert "| model.onnx in OpenVINO (CPU, f32) | W4A32 |" in report_md
  assert "ONNX Runtime runs model.onnx (float activations)" in report_md


@pytest.mark.parametrize("opts", [dict(bits=2, granularity="group", group_size=4),
                                  dict(bits=3, cluster_dim=2)],
                         ids=["bits2_grouped", "bits3_vector2"])
def test_openvino_unpacks_the_bit_packed_indices_as_load_packed(opts):
  _openvino()
  from repvgg_jax.deploy.onnx import export_onnx
  packed = tiny_packed("cluster", act_bits=0, **opts)
  images = uint8_images(32, 18)
  got = ov_deploy.onnx_fn(export_onnx(packed).SerializeToString())(images)
  want = np.asarray(rv.DeployedModel(packed)(images))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_openvino_runs_the_int8_grid_model_onnx_as_the_integer_forward(int8_run):
  workdir, report = int8_run
  images = _test_images(workdir)
  fn = ov_deploy.onnx_fn(os.path.join(workdir, "model.onnx"))
  got = fn(images)
  deployed = rv.load_packed(os.path.join(workdir, "model.packed"))
  want = np.asarray(deployed.integer(images))
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  # Every conv and the head run as int8 kernels (u8 activations x i8 weights), whatever
  # the float precision hint.
  for precision in ("f32", "bf16"):
    assert set(_kernel_precisions(ov_deploy.onnx_fn(os.path.join(workdir, "model.onnx"),
                                                    precision=precision))) == {"u8"}
  forms = report["forms"]
  assert forms["openvino"]["agreement"] == 1.0  # the trainer's count: the same predictions
  assert forms["openvino"]["accuracy"] == forms["integer"]["accuracy"]
  report_md = open(os.path.join(workdir, "report.md")).read()
  assert "| model.onnx in OpenVINO (CPU, f32) | W4A8 |" in report_md
  assert "ONNX Runtime runs model.onnx (8-bit activations as uint8)" in report_md
  assert "OpenVINO runs the same file (CPU, f32 float ops) and predicts as the integer " \
         "forward on 100.00%" in report_md


def test_bad_precision_is_named():
  with pytest.raises(ValueError, match="precision='fp32'"):
    ov_deploy.onnx_fn(b"", precision="fp32")


def test_missing_openvino_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "openvino", None)  # importing it now fails
  with raises_naming(ImportError, "OpenVINO", "repvgg-jax[openvino]") as e:
    ov_deploy.onnx_fn(b"")
  assert "\n" not in str(e.value)  # one line
  assert e.value.__cause__ is None and e.value.__suppress_context__  # and no chain
  monkeypatch.setattr(ov_deploy, "available", lambda: False)
  assert ov_deploy.report_fn(b"") is None  # the trainer skips the form

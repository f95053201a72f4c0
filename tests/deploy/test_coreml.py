"""Core ML export, read back from the saved package: every LUT decodes (by coremltools'
own decompression) to the packed file's kernel bit for bit, indices are stored at the LUT's
bits, activation steps are ours, SE and grouped variants export, the write is atomic.
Core ML's runtime is macOS-only: no prediction runs here."""

import os

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil.frontend.milproto.load import load as load_milproto  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (  # noqa: E402
    constexpr_lut_to_dense)
from coremltools.proto import MIL_pb2  # noqa: E402

from repvgg_jax.deploy.coreml import LUT_BITS, export_coreml  # noqa: E402
from repvgg_jax.models.repvgg import RepVGG, SIGNED_INPUT_LAYER, Variant  # noqa: E402
from repvgg_jax.quant import uniform  # noqa: E402
from _util import TINY_DEPLOY, mixed_packed, raises_naming, tiny_packed  # noqa: E402


def _read_back(path):
  """(the saved package's MIL ops by name, {LUT op name: storage dtype of its indices})."""
  ml = ct.models.MLModel(str(path), skip_model_load=True)
  spec = ml.get_spec()
  prog = load_milproto(spec, specification_version=spec.specificationVersion,
                       file_weights_dir=ml.weights_dir)
  ops = {op.name: op for op in prog.functions["main"].operations}
  fn = spec.mlProgram.functions["main"]
  stored = {op.outputs[0].name: MIL_pb2.DataType.Name(
                op.inputs["indices"].arguments[0].value.type.tensorType.dataType)
            for op in fn.block_specializations[fn.opset].operations
            if op.type == "constexpr_lut_to_dense"}
  return ops, stored


def _kernels(packed):
  """{packed layer path: its decoded kernel in Core ML's layout (output channels first)}."""
  params = packed.to_variables()["params"]
  out = {}
  for path in packed.layers:
    k = params
    for part in path.split("/"):
      k = k[part]
    k = np.asarray(k, np.float32)
    out[path] = k.transpose(3, 2, 0, 1) if k.ndim == 4 else k.T
  return out


def _assert_luts_decode_to_the_packed_kernels(packed, path):
  ops, stored = _read_back(path)
  kernels = _kernels(packed)
  luts = {n: op for n, op in ops.items() if op.op_type == "constexpr_lut_to_dense"}
  assert sorted(luts) == sorted(p.replace("/", "_") for p in kernels)
  for p, want in kernels.items():
    op, bits = luts[p.replace("/", "_")], int(packed.layers[p]["bits"])
    idx, lut = op.indices.val, op.lut.val
    assert lut.shape[-2] == 2 ** LUT_BITS[bits], p
    assert stored[op.name] == ("UINT8" if LUT_BITS[bits] == 8 else f"UINT{LUT_BITS[bits]}"), p
    assert int(idx.max()) < 2 ** bits, p  # padded entries are never indexed
    axis = None if op.vector_axis is None else int(op.vector_axis.val)
    assert axis == (1 if packed.layers[p].get("cluster_dim", 1) > 1 else None), p
    got = constexpr_lut_to_dense.decompress(idx, lut, axis)
    assert got.dtype == np.float32 and got.shape == want.shape, p
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=p)


@pytest.mark.parametrize("make", [lambda: mixed_packed("scalar"), lambda: mixed_packed("vector"),
                                  lambda: tiny_packed("cluster", int8_levels=True),
                                  lambda: tiny_packed("lsq")],
                         ids=["mixed_scalar", "mixed_vector", "w4_int8_grid", "lsq_w4"])
def test_every_lut_decodes_to_the_packed_kernel_bit_for_bit(tmp_path, make):
  packed = make()  # every layout (bits, per tensor/channel/group, vectors) on some layer
  path = tmp_path / "model.mlpackage"
  export_coreml(packed, path)
  _assert_luts_decode_to_the_packed_kernels(packed, path)


def test_a_changed_index_fails_the_comparison(tmp_path, monkeypatch):
  """The check above can fail: one index moved by one in the exported head."""
  from repvgg_jax.deploy import coreml
  packed = tiny_packed("cluster", bits=4)
  real = coreml._index_array

  def off_by_one(idx, bits):
    out = real(idx, bits).copy()
    out.flat[0] = (int(out.flat[0]) + 1) % (2 ** bits)
    return out
  monkeypatch.setattr(coreml, "_index_array", off_by_one)
  export_coreml(packed, tmp_path / "model.mlpackage")
  with pytest.raises(AssertionError):
    _assert_luts_decode_to_the_packed_kernels(packed, tmp_path / "model.mlpackage")


@pytest.mark.parametrize("act_bits", [8, 4])
def test_activations_are_quantized_at_our_steps(tmp_path, act_bits):
  packed = tiny_packed("cluster", act_bits=act_bits)
  export_coreml(packed, tmp_path / "model.mlpackage")
  ops, _ = _read_back(tmp_path / "model.mlpackage")
  quant = packed.to_variables()["quant"]
  layers = [b.name for b in RepVGG(TINY_DEPLOY, deploy=True).layers()] + ["head"]
  quantizes = [op for op in ops.values() if op.op_type == "quantize"]
  layers.append("head_pool")  # the map the head's pool averages
  assert len(quantizes) == len(layers)
  for layer in layers:
    var = {"head": quant["head_act"], "head_pool": quant["pool_act"]}.get(layer)
    step = np.float32(uniform.learned_step(np.asarray((var or quant[layer]["act"])["step"])))
    q, dq = ops[f"{layer}_act_quantized"], ops[f"{layer}_act_dequantized"]
    assert q.scale.val.dtype == np.float32 and q.scale.val == step, layer
    assert dq.scale.val == step and int(q.zero_point.val) == 0, layer
    signed = layer == SIGNED_INPUT_LAYER
    assert q.output_dtype.val == ("int8" if signed else "uint8"), layer
    clip = ops.get(f"{layer}_act_clip")
    if act_bits == 8:
      assert clip is None, layer
    else:
      qmin, qmax = uniform.int_range(act_bits, signed)
      assert (clip.alpha.val, clip.beta.val) == (np.float32(qmin * step),
                                                 np.float32(qmax * step)), layer


def test_float_activation_model_has_no_quantize_ops(tmp_path):
  packed = tiny_packed("cluster", act_bits=0)
  export_coreml(packed, tmp_path / "model.mlpackage")
  ops, _ = _read_back(tmp_path / "model.mlpackage")
  assert not [op for op in ops.values() if op.op_type in ("quantize", "dequantize")]
  _assert_luts_decode_to_the_packed_kernels(packed, tmp_path / "model.mlpackage")


@pytest.mark.parametrize("variant", [Variant((1, 2, 1, 1), (0.5, 0.5, 0.5, 0.5), groups=2),
                                     Variant((1, 2, 1, 1), (1, 1, 1, 1), se=True)],
                         ids=["groups2", "se"])
def test_grouped_and_se_variants_export(tmp_path, variant):
  packed = tiny_packed("cluster", variant=variant)
  export_coreml(packed, tmp_path / "model.mlpackage")
  _assert_luts_decode_to_the_packed_kernels(packed, tmp_path / "model.mlpackage")
  ops, _ = _read_back(tmp_path / "model.mlpackage")
  convs = [op for op in ops.values() if op.op_type == "conv"]
  if variant.groups > 1:
    assert {int(op.groups.val) for op in convs} == {1, variant.groups}
  else:  # two float 1x1 convs of each SE
    assert sum(op.name.endswith(("_se_down", "_se_up")) for op in convs) == \
        2 * len(RepVGG(variant, deploy=True).layers())


def test_a_failed_write_leaves_the_old_package_whole(tmp_path, monkeypatch):
  path = tmp_path / "model.mlpackage"
  old = tiny_packed("cluster", bits=4)
  export_coreml(old, path)
  new = tiny_packed("cluster", bits=2)

  def broken_save(self, target):
    os.makedirs(os.path.join(target, "Data"))
    raise OSError("disk full")
  monkeypatch.setattr(ct.models.MLModel, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    export_coreml(new, path)
  assert os.listdir(tmp_path) == ["model.mlpackage"]  # no temporary left behind
  _assert_luts_decode_to_the_packed_kernels(old, path)
  monkeypatch.undo()
  export_coreml(new, path)  # replaces the old package
  assert os.listdir(tmp_path) == ["model.mlpackage"]
  _assert_luts_decode_to_the_packed_kernels(new, path)


def test_gray_batch_input_is_tiled_to_rgb_inside(tmp_path):
  packed = tiny_packed("cluster", bits=4)
  path = tmp_path / "model.mlpackage"
  export_coreml(packed, path, batch_size=4, channels=1)
  spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
  (inp,) = spec.description.input
  assert list(inp.type.multiArrayType.shape) == [4, 32, 32, 1]
  ops, _ = _read_back(path)
  assert [int(r) for r in ops["images_rgb"].reps.val] == [1, 1, 1, 3]


def test_bad_arguments_are_named(tmp_path):
  packed = tiny_packed("cluster", bits=4)
  with raises_naming(ValueError, "model.onnx", ".mlpackage"):
    export_coreml(packed, tmp_path / "model.onnx")
  with pytest.raises(ValueError, match="channels=2"):
    export_coreml(packed, tmp_path / "model.mlpackage", channels=2)
  with pytest.raises(ValueError, match="batch_size=0"):
    export_coreml(packed, tmp_path / "model.mlpackage", batch_size=0)
  assert not os.listdir(tmp_path)

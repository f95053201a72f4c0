"""ONNX QDQ export, checked by ONNX Runtime: the int8-grid graph against the integer
forward, the codebook graph against load_packed, the fused kernels, the refusals."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import repvgg_jax as rv  # noqa: E402
from repvgg_jax.deploy.graph import deploy_graph  # noqa: E402
from repvgg_jax.deploy.onnx import export_onnx  # noqa: E402
from repvgg_jax.models.repvgg import RepVGG, Variant  # noqa: E402
from _util import TINY_DEPLOY, mixed_packed, raises_naming, tiny_packed, uint8_images  # noqa: E402

def _session(proto_or_path, level=None, optimized_path=None):
  so = ort.SessionOptions()
  so.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  if optimized_path:
    so.optimized_model_filepath = str(optimized_path)
  model = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") \
      else str(proto_or_path)
  return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _run(proto, images, **kw):
  return _session(proto, **kw).run(["logits"], {"images": images})[0]


def _assert_same_logits(got, want):
  """The same network: float32 rounding of the sums only (different orders), on every
  image. One activation moved by one step, anywhere, is far above this."""
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _assert_same_but_rare_flips(got, want):
  """The same network where the float32 sums are rounded in another order, so that now
  and then an activation lands one step over a rounding boundary: the same numbers on
  nearly every image, and one step's worth from them on the others."""
  same = np.abs(got - want).max(1) <= 1e-5 * np.abs(want).max()
  assert same.mean() >= 0.9 and np.abs(got - want).max() <= 0.01 * np.abs(want).max()


@pytest.mark.parametrize("method, opts", [
    ("cluster", dict(int8_levels=True)), ("lsq", {}), ("uniform", dict(clipping="mse")),
    ("cluster", dict(int8_levels=True, granularity="group", group_size=4))])
def test_int8_grid_export_runs_the_integer_forward_in_onnx_runtime(method, opts):
  packed = tiny_packed(method, **opts)
  proto = export_onnx(packed)
  onnx.checker.check_model(proto, full_check=True)
  images = uint8_images(48, 11)
  want = np.asarray(rv.DeployedModel(packed).integer(images))
  _assert_same_logits(_run(proto, images), want)
  # Without graph optimizations (QDQ run as written: float convs of the dequantized
  # tensors) the sums are float (2 of 48 images flip for the grouped codebooks).
  _assert_same_but_rare_flips(
      _run(proto, images, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL), want)
  _assert_same_logits(_run(proto, images[..., :1]),
                      np.asarray(rv.DeployedModel(packed).integer(images[..., :1])))


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_int8_grid_export_looks_up_the_quantized_input_of_every_pixel_value(activations):
  """The first conv's input integers, read out of ONNX Runtime for an image holding every
  uint8 value in each channel: the normalization and rounding computed here in numpy
  float32, and no float op before the first conv."""
  packed = tiny_packed("uniform", act_bits=7 if activations == "int8" else 8)
  graph = deploy_graph(packed)
  stem = graph.layers[0]
  values = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(1, 32, 32)
  images = np.stack([values, values[:, ::-1], np.roll(values, 7)], axis=-1)
  proto = export_onnx(packed, activations=activations)
  probe = onnx.ModelProto()
  probe.CopyFrom(proto)
  name = f"{stem.name}/act/quantized"
  dtype = onnx.TensorProto.UINT8 if activations == "uint8" else onnx.TensorProto.INT8
  probe.graph.output.extend([onnx.helper.make_tensor_value_info(name, dtype, None)])
  got = _session(probe).run([name], {"images": images})[0].astype(np.int32)
  x = images.astype(np.float32) * np.float32(1 / 255)
  x = (x - np.float32(graph.mean)) / np.float32(graph.std)
  lo, hi = (-64, 63) if activations == "int8" else (-128, 127)
  want = np.round(np.clip(x / np.float32(stem.act_step), lo, hi)).astype(np.int32)
  zp = 128 if activations == "uint8" else 0
  np.testing.assert_array_equal(got - zp, want.transpose(0, 3, 1, 2))
  first_conv = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Conv")
  ops = {n.op_type for n in proto.graph.node[:first_conv]}
  assert "Gather" in ops and not ops & {"Mul", "Sub", "Div"}, ops


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_codebook_export_runs_load_packed_in_onnx_runtime(kind, tmp_path):
  packed = mixed_packed(kind)  # every codebook layout on some layer (tests/_util.py)
  proto = export_onnx(packed)
  images = uint8_images(48, 12)
  want = np.asarray(rv.DeployedModel(packed)(images))
  # The graph's decoded kernels, read out of ONNX Runtime: the packed file's, bit for bit.
  decoded = [f"{p}/kernel" if l.get("cluster_dim", 1) > 1 else f"{p}/decoded"
             for p, l in packed.layers.items()]
  probe = onnx.ModelProto()
  probe.CopyFrom(proto)
  probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                            for n in decoded)
  got = _session(probe).run(None, {"images": images})
  for name, kernel in zip(decoded, got[1:]):
    k = packed.kernel(name.rsplit("/", 1)[0])
    np.testing.assert_array_equal(kernel, k.transpose(3, 2, 0, 1) if k.ndim == 4 else k.T,
                                  err_msg=name)
  # Default optimizations, as a user runs it: float convs of the same kernels, whose sums
  # ONNX Runtime rounds in its own order (1 of 48 images flips for 2-vectors).
  _assert_same_but_rare_flips(got[0], want)
  ops = {n.op_type for n in proto.graph.node}
  assert "Gather" in ops and "QuantizeLinear" not in ops
  # The indices stored as the packed file stores them: its bit-packed bytes, unchanged;
  # a grouped codebook once per group, as there.
  inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
  for p, l in packed.layers.items():
    assert inits[f"{p}/packed"].dtype == np.uint8
    np.testing.assert_array_equal(inits[f"{p}/packed"], l["packed"])
    np.testing.assert_array_equal(inits[f"{p}/codebook"].ravel(), l["codebook"].ravel())
  # ONNX Runtime folds the whole decode at load: in its optimized graph no op of the
  # index path is left, and every conv's and the head's kernel is an initializer.
  for level in ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
    path = tmp_path / f"{level}.onnx"
    _session(proto, level=getattr(ort.GraphOptimizationLevel, level), optimized_path=path)
    optimized = onnx.load(path).graph
    ops = [n.op_type for n in optimized.node]
    assert not {"Gather", "ReduceSum", "Slice", "Reshape", "Add"} & set(ops), (level, ops)
    assert ops.count("Cast") == 1, (level, ops)  # the images' (uint8 -> float)
    kernels = [n.input[1] for n in optimized.node if n.op_type in ("Conv", "FusedConv", "Gemm")]
    assert len(kernels) == len(packed.layers), (level, ops)
    assert set(kernels) <= {i.name for i in optimized.initializer}, level


def test_float_activation_export_matches_load_packed():
  packed = tiny_packed("cluster", act_bits=0, int8_levels=True)
  images = uint8_images(16, 13)
  _assert_same_logits(_run(export_onnx(packed), images), np.asarray(rv.DeployedModel(packed)(images)))


@pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_onnx_runtime_runs_every_layer_of_an_int8_grid_export_as_integer_ops(tmp_path, level):
  # The tiny model's maps go down to 2x2 and 1x1 (the last conv's, which the pool reads).
  packed = tiny_packed("cluster", int8_levels=True)
  proto = export_onnx(packed)
  path = tmp_path / "optimized.onnx"
  _session(proto, level=getattr(ort.GraphOptimizationLevel, level), optimized_path=path)
  optimized = onnx.load(path).graph
  ops = [n.op_type for n in optimized.node]
  convs = len(RepVGG(TINY_DEPLOY, deploy=True).layers())
  assert ops.count("QLinearConv") == convs, ops
  assert ops.count("QLinearGlobalAveragePool") == 1 and ops.count("QGemm") == 1, ops
  float_ops = {"Conv", "FusedConv", "Gemm", "MatMul", "GlobalAveragePool", "ReduceMean",
               "DequantizeLinear"}
  assert not float_ops & set(ops), ops
  # No weight is dequantized at run time: every int8 and int32 initializer feeds an integer op.
  inits = {i.name for i in optimized.initializer}
  for n in optimized.node:
    if n.op_type in ("DequantizeLinear", "Cast"):
      assert n.input[0] not in inits, n.name
  images = uint8_images(48, 21)
  got = _run(proto, images, level=getattr(ort.GraphOptimizationLevel, level))
  want = np.asarray(rv.DeployedModel(packed).integer(images))
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  _assert_same_logits(got, want)


def _demo_test_images(n):
  """The first ``n`` Fashion-MNIST test images as the demo's loader gives them (uint8,
  padded to 32 px, one channel); skips without the Debian package's files."""
  from configs import demo
  from repvgg_jax import data
  if not os.path.isdir(data.DEFAULT_IDX_DIR):
    pytest.skip(f"{data.DEFAULT_IDX_DIR} missing (apt-get install dataset-fashion-mnist)")
  loader = data.make_loader(demo.get_config().data, "test", global_batch_size=n, train=False)
  return np.asarray(next(iter(loader))["image"])


@pytest.mark.parametrize("net", ["demo", "a0_224"])
def test_demo_and_a0_run_every_conv_and_the_head_as_integer_ops(net):
  """The demo's network on its own test images, and the paper's at ImageNet's size (random
  weights, uniform int8-grid kernels): ONNX Runtime's optimized graph has one QLinearConv a
  layer, the integer pool and QGemm, and gives the integer forward's logits."""
  from repvgg_jax.models.zoo import VARIANTS
  a0 = VARIANTS["RepVGG-A0"]
  if net == "demo":
    variant, size = Variant((1, 2, 4, 1), a0.widths), 32
    images = _demo_test_images(256)
  else:
    variant, size = a0, 224
    images = uint8_images(2, 22, size=224)
  packed = tiny_packed("uniform", variant=variant, image_size=size, bits=8)
  proto = export_onnx(packed, integer=True)
  _assert_same_logits(_run(proto, images), np.asarray(rv.DeployedModel(packed).integer(images)))
  ops = _optimized_ops(proto)
  assert ops.count("QLinearConv") == len(RepVGG(variant, deploy=True).layers()), ops
  assert ops.count("QLinearGlobalAveragePool") == 1 and ops.count("QGemm") == 1, ops
  assert not {"Conv", "FusedConv", "Gemm", "MatMul", "GlobalAveragePool"} & set(ops), ops


def _optimized_ops(proto):
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "optimized.onnx")
    _session(proto, optimized_path=path)
    return [n.op_type for n in onnx.load(path).graph.node]


@pytest.mark.parametrize("make, layer, why", [
    (lambda: tiny_packed("cluster"), "stem", "codebook off the int8 grid"),
    (lambda: tiny_packed("cluster", act_bits=0, int8_levels=True), "stem", "act_bits=0"),
    (lambda: tiny_packed("cluster", int8_levels=True,
                         variant=Variant((1, 1, 1, 1), (0.25,) * 4, se=True)),
     "stem", "squeeze-excite")])
def test_integer_export_names_the_layer_onnx_runtime_cannot_run_as_integer(make, layer, why):
  with raises_naming(ValueError, "integer=True", f"layer {layer} ", why):
    export_onnx(make(), integer=True)
  export_onnx(make())  # without integer=True the same model exports (float where it must)


def _mutated(proto, name, change):
  """A copy of ``proto`` with initializer ``name`` replaced by ``change(array)``."""
  out = onnx.ModelProto()
  out.CopyFrom(proto)
  for init in out.graph.initializer:
    if init.name == name:
      init.CopyFrom(onnx.numpy_helper.from_array(change(onnx.numpy_helper.to_array(init)), name))
      return out
  raise KeyError(name)


@pytest.mark.parametrize("name, change", [
    ("stages_1_0/act/scale", lambda s: (s * (1 + 2.0 ** -7)).astype(np.float32)),
    ("stages_1_0/reparam_conv/kernel/scale", lambda s: (s * (1 + 2.0 ** -7)).astype(np.float32)),
    ("stem/act/zero_point", lambda z: np.uint8(z + 1)),
    ("stages_0_0/reparam_conv/bias/int32", lambda b: b + 1),
    ("head/pool/act/scale", lambda s: (s * (1 + 2.0 ** -7)).astype(np.float32)),
    ("head/bias/int32", lambda b: b + np.int32(np.abs(b).max() // 64 + 1)),
    ("stages_2_0/reparam_conv/kernel/int8", lambda k: np.where(k == k.max(), k - 1, k).astype(
        np.int8)),
])
def test_a_wrong_scale_zero_point_or_bias_fails_the_comparison(name, change):
  packed = tiny_packed("cluster", int8_levels=True)
  proto = export_onnx(packed)
  images = uint8_images(48, 11)
  want = np.asarray(rv.DeployedModel(packed).integer(images))
  _assert_same_logits(_run(proto, images), want)
  with pytest.raises(AssertionError):
    _assert_same_logits(_run(_mutated(proto, name, change), images), want)


def test_signed_int8_export_needs_activations_int8_can_hold():
  with raises_naming(ValueError, "activations='int8'", "stages_0_0", "[0, 255]",
                     "quant.act_bits=7"):
    export_onnx(tiny_packed("cluster", int8_levels=True), activations="int8")
  packed = tiny_packed("cluster", act_bits=7, int8_levels=True)
  proto = export_onnx(packed, activations="int8")
  zps = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
         if i.name.endswith("act/zero_point")]
  assert zps and all(z.dtype == np.int8 and z == 0 for z in zps)
  images = uint8_images(32, 14)
  _assert_same_logits(_run(proto, images), np.asarray(rv.DeployedModel(packed).integer(images)))


def test_int8_export_refuses_a_weight_level_at_minus_128():
  packed = tiny_packed("uniform", act_bits=7, bits=8)  # levels k * step, k in [-128, 127]
  path = "stages_1_0/reparam_conv/kernel"
  idx = packed.indices(path)
  idx.flat[0] = 0  # level -128 * step
  packed.layers[path]["packed"] = rv.quant.pack_bits(idx, 8)
  with raises_naming(ValueError, path, "-128"):
    export_onnx(packed, activations="int8")
  images = uint8_images(8, 17)  # uint8 activations: ONNX Runtime's x86 path takes the full range
  _assert_same_logits(_run(export_onnx(packed), images),
                      np.asarray(rv.DeployedModel(packed).integer(images)))


@pytest.mark.parametrize("variant", [Variant((1, 2, 1, 1), (0.5, 0.5, 0.5, 0.5), groups=2),
                                     Variant((1, 2, 1, 1), (1, 1, 1, 1), se=True)],
                         ids=["groups2", "se"])
def test_grouped_and_se_variants_export(variant):
  packed = tiny_packed("cluster", variant=variant)
  images = uint8_images(48, 15)
  # Float convs (and SE), rounded in ONNX Runtime's order, then the pooled map's grid.
  _assert_same_but_rare_flips(_run(export_onnx(packed), images),
                              np.asarray(rv.DeployedModel(packed)(images)))
  if not variant.se:
    packed = tiny_packed("cluster", variant=variant, int8_levels=True)
    _assert_same_logits(_run(export_onnx(packed), images),
                        np.asarray(rv.DeployedModel(packed).integer(images)))


def test_bad_activations_value_is_named():
  with pytest.raises(ValueError, match="activations='int4'"):
    export_onnx(tiny_packed("cluster"), activations="int4")


_STANDALONE = textwrap.dedent("""
    import sys
    for name in ("repvgg_jax", "jax", "jaxlib", "onnx"):
      sys.modules[name] = None              # importing them now fails
    import numpy as np, onnxruntime as ort
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    np.save(sys.argv[3], sess.run(["logits"], {"images": np.load(sys.argv[2])})[0])
""")


def test_model_onnx_runs_with_only_onnxruntime_and_numpy(tmp_path):
  packed = tiny_packed("cluster", int8_levels=True)
  path = tmp_path / "model.onnx"
  export_onnx(packed, path)
  images = uint8_images(8, 16)
  np.save(tmp_path / "images.npy", images)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", _STANDALONE, str(path), str(tmp_path / "images.npy"),
                  str(tmp_path / "out.npy")], check=True, env=env, cwd=tmp_path)
  _assert_same_logits(np.load(tmp_path / "out.npy"),
                      np.asarray(rv.DeployedModel(packed).integer(images)))

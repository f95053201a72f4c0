"""The deploy graph: one description of the deployed network that every runtime and exporter walks."""

import dataclasses
import inspect

import jax
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.deploy import coreml, graph as graph_lib, integer, onnx, runtime, stablehlo
from repvgg_jax.models.repvgg import RepVGG

from _util import TINY_DEPLOY, tiny_packed, uint8_images


def test_the_graph_lists_every_conv_then_the_pooled_head():
  g = graph_lib.deploy_graph(tiny_packed())
  specs = RepVGG(TINY_DEPLOY, deploy=True).layers()
  assert [l.name for l in g.layers] == [b.name for b in specs] + ["head"]
  assert [(l.strides, l.groups) for l in g.layers[:-1]] == [(b.strides, b.groups) for b in specs]
  # Only the first layer reads the signed, normalized image; only the head pools.
  assert [l.act_signed for l in g.layers] == [True] + [False] * len(specs)
  assert [l.pool for l in g.layers] == [False] * len(specs) + [True]
  assert all(l.act_step is not None and l.act_step > 0 for l in g.layers)
  assert all(l.act_step is None for l in graph_lib.deploy_graph(tiny_packed(act_bits=0)).layers)


def test_a_description_without_its_fields_is_named():
  packed = tiny_packed()
  packed = dataclasses.replace(packed, model={k: v for k, v in packed.model.items()
                                              if k != "widths"})
  with pytest.raises(ValueError, match="widths"):
    graph_lib.deploy_graph(packed)


def _with_repeated_layer(g):
  """``g`` with a copy of its first stride-1, same-width conv (and of its weights, under a
  new name) inserted after it."""
  i = next(i for i, l in enumerate(g.layers) if l.kind == "conv" and l.strides == 1
           and g.kernel_shape(l)[2] * l.groups == g.kernel_shape(l)[3])
  layer = g.layers[i]
  name = layer.name + "_again"
  kernel = f"{name}/reparam_conv/kernel"
  packed = dataclasses.replace(g.packed, layers={**g.packed.layers,
                                                 kernel: g.packed.layers[layer.kernel]})
  extra = dataclasses.replace(layer, name=name, kernel=kernel)
  return g.replace(layers=g.layers[:i + 1] + (extra,) + g.layers[i + 1:], packed=packed)


def _onnx_logits(model, images):
  import onnxruntime
  s = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  return s.run(["logits"], {"images": images})[0]


def test_every_runtime_follows_a_layer_added_to_the_graph():
  pytest.importorskip("onnxruntime")
  g = graph_lib.deploy_graph(tiny_packed(int8_levels=True))
  bigger = _with_repeated_layer(g)
  images = uint8_images(8, seed=1)
  before = np.asarray(runtime.forward_fn(g)(images))
  jax_out = np.asarray(jax.jit(runtime.forward_fn(bigger))(images))
  assert np.abs(jax_out - before).max() > 1e-3  # the extra layer changes the network
  hlo = jax.export.deserialize(stablehlo.export_stablehlo(bigger)).call(images)
  np.testing.assert_allclose(hlo, jax_out, rtol=1e-5, atol=1e-5)
  # ONNX Runtime's integer convs and the integer forward round the requantization their
  # own way: each is far closer to the network with the added layer than to the one without.
  for name, out in (("onnx", _onnx_logits(onnx.export_onnx(bigger), images)),
                    ("integer", jax.jit(integer.integer_forward_fn(bigger))(images))):
    out = np.asarray(out)
    assert np.abs(out - jax_out).max() < 0.25 * np.abs(out - before).max(), name


def _with_step(g, i, factor):
  """``g`` with layer ``i``'s activation step times ``factor``: (graph, layer, new step)."""
  layer = g.layers[i]
  step = np.float32(layer.act_step * factor)
  return (g.replace(layers=tuple(dataclasses.replace(l, act_step=step) if l is layer else l
                                 for l in g.layers)), layer, step)


def test_every_exporter_follows_a_changed_activation_step():
  pytest.importorskip("onnxruntime")
  g = graph_lib.deploy_graph(tiny_packed())
  changed, layer, step = _with_step(g, 2, 3)
  proto = onnx.export_onnx(changed)
  scales = {i.name: i for i in proto.graph.initializer}
  got = np.frombuffer(scales[f"{layer.name}/act/scale"].raw_data, np.float32)
  assert got.tolist() == [step]
  images = uint8_images(4, seed=2)
  assert np.abs(np.asarray(runtime.forward_fn(changed)(images))
                - np.asarray(runtime.forward_fn(g)(images))).max() > 1e-4
  np.testing.assert_allclose(_onnx_logits(proto, images), runtime.forward_fn(changed)(images),
                             rtol=1e-4, atol=1e-4)


def test_core_ml_follows_a_changed_activation_step(tmp_path):
  pytest.importorskip("coremltools")
  g = graph_lib.deploy_graph(tiny_packed())
  changed, layer, step = _with_step(g, 1, 5)
  path = str(tmp_path / "m.mlpackage")
  coreml.export_coreml(changed, path)
  import coremltools as ct
  from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
  ml = ct.models.MLModel(path, skip_model_load=True)
  spec = ml.get_spec()
  prog = load_milproto(spec, specification_version=spec.specificationVersion,
                       file_weights_dir=ml.weights_dir)
  ops = {op.name: op for op in prog.functions["main"].operations}
  assert ops[f"{layer.name}_act_quantized"].scale.val == step
  other = g.layers[2]
  assert ops[f"{other.name}_act_quantized"].scale.val == other.act_step


@pytest.mark.parametrize("module", [coreml, integer, onnx, runtime, stablehlo])
def test_no_runtime_walks_stages_or_knows_the_stem(module):
  source = inspect.getsource(module)
  for word in ("stages", "stem", "SIGNED_INPUT_LAYER", ".layers()", "head_act"):
    assert word not in source, f"{module.__name__} mentions {word!r}"


def test_load_packed_runs_the_graph_of_its_file(tmp_path):
  packed = tiny_packed()
  packed.save(tmp_path / "m.packed")
  model = rv.load_packed(tmp_path / "m.packed")
  assert [l.name for l in model.graph.layers] == [
      l.name for l in graph_lib.deploy_graph(packed).layers]
  images = uint8_images(4)
  np.testing.assert_array_equal(model(images), jax.jit(runtime.forward_fn(packed))(images))

"""ONNX export of the packed model with explicit QuantizeLinear/DequantizeLinear (QDQ).

:func:`export_onnx` writes the network that :func:`repvgg_jax.load_packed` runs, as
an ONNX graph that ONNX Runtime and TensorRT read: uint8 NHWC images in (1 or 3
channels), float32 logits out, the input normalization inside the graph (where the first
conv's weights are on an int8 grid, its quantized input is looked up instead: one
``Gather`` of each pixel's value on the grid from a table of the 3 x 256 channel values).

* Activations: the input of every conv and of the head goes through a
  ``QuantizeLinear -> DequantizeLinear`` pair at *our* calibrated or learned step
  (zero-point 0; a signed input, the image's, at zero-point 128 in ``uint8`` mode), so the
  graph rounds where the fake-quant forward rounds. ``activations="uint8"`` is the
  form ONNX Runtime fuses on x86 (``QLinearConv``); ``"int8"`` is TensorRT's explicit
  quantization (signed, zero-point 0), which cannot hold an unsigned 8-bit grid
  ``[0, 255]``: such a model is refused (train with ``quant.act_bits=7``, whose
  ``[0, 127]`` fits int8 exactly). Below 8 bits a ``Clip`` to the grid's range comes
  first (QuantizeLinear saturates only at the type's range). The map a layer pools is
  quantized at its ``pool_step`` and the pooled vector at the layer's step, with the
  ``Flatten`` on the quantized tensor: ``Relu -> Q -> DQ -> GlobalAveragePool -> Q ->
  Flatten -> DQ -> Gemm``, which ONNX Runtime runs as ``QLinearConv``,
  ``QLinearGlobalAveragePool`` and ``QGemm`` (int8-grid weights): no float conv, pool or
  product, and no weight dequantized at run time.
* Weights on an int8 grid (``int8_levels=True``, uniform, LSQ): int8 initializers with
  per-output-channel scales (``DequantizeLinear`` axis 0) and an int32 bias at scale
  ``s_in * s_w[o]`` (the convs' and the head's): integer convolutions and products in
  the runtime, the same numbers as :func:`repvgg_jax.deploy.integer_forward_fn`. ``"int8"`` mode needs the
  narrow range ``[-127, 127]`` (TensorRT, LiteRT); a level at -128 is refused.
* Other codebooks (plain ClusterQAT): the indices as the packed file stores them (its
  ``b``-bit packed bytes, unchanged) and its codebook (a grouped one once per group),
  decoded in the graph to the exact float kernel by ops on constants (opset 17): a
  ``Gather`` from a 256-row table splits each byte into its ``b``-bit fields (single bits
  where ``b`` does not divide 8, summed into indices by ``Mul`` and ``ReduceSum``), a
  ``Slice``, ``Reshape`` and ``Transpose`` lay them out as ONNX's kernel, one ``Gather``
  takes the codebook's levels (a vector codebook, ``cluster_dim=d``: its d-vectors, then
  a ``Transpose`` and ``Reshape`` that lay each vector along the input channels). The
  runtime folds it into a float initializer at load and runs a float conv on the
  quantized activations: the same network as ``load_packed``, a file about the packed
  file's size, no integer kernels.
* SE layers (D2se) stay float (pool, 1x1 convs, sigmoid, multiply).

Every export passes ``onnx.checker.check_model(..., full_check=True)``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from repvgg_jax.deploy.graph import Graph, Layer, deploy_graph
from repvgg_jax.deploy.integer import input_integers, int32_bias
from repvgg_jax.fileio import atomic_write_bytes
from repvgg_jax.quant import uniform
from repvgg_jax.quant.packed import PackedModel
from repvgg_jax.quant.vector import index_shape

ACTIVATIONS = ("uint8", "int8")
# QuantizeLinear/DequantizeLinear with per-axis scales (13+); TensorRT 10 and ONNX
# Runtime both read 17.
OPSET = 17


def available() -> bool:
  """Whether an ONNX model can be written and run here (onnx and onnxruntime import)."""
  return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def check_activations(activations: str, act_bits: int) -> None:
  """ValueError where ``activations`` cannot hold a model's ``act_bits`` activations
  exactly: the unsigned 8-bit grid [0, 255] does not fit signed int8."""
  if activations not in ACTIVATIONS:
    raise ValueError(f"activations={activations!r}: expected one of {ACTIVATIONS}")
  if activations == "int8" and act_bits == 8:
    raise ValueError("activations='int8' (signed, zero-point 0) cannot hold unsigned 8-bit "
                     "activations [0, 255]; use 'uint8', or train with quant.act_bits=7 "
                     "([0, 127] fits int8)")


def _import_onnx():
  try:
    import onnx
  except ImportError as e:
    raise ImportError("export_onnx needs the onnx package: pip install 'repvgg-jax[onnx]' "
                      "(or pip install onnx onnxruntime)") from e
  return onnx


class _Graph:
  """Nodes and initializers under construction, with unique names."""

  def __init__(self, onnx):
    self.onnx, self.nodes, self.inits = onnx, [], []

  def const(self, name: str, value: np.ndarray) -> str:
    self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def const_once(self, name: str, value, dtype) -> str:
    """``name``, a constant shared by every layer: added the first time."""
    if all(i.name != name for i in self.inits):
      self.const(name, np.asarray(value, dtype))
    return name

  def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
    self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [name], name=name, **attrs))
    return name


def _act_grid(bits: int, signed: bool, activations: str, layer: str):
  """(ONNX zero point as a numpy scalar, clip range of the integers or None) of a
  layer's activation grid; ValueError where ``activations`` cannot hold it exactly."""
  qmin, qmax = uniform.int_range(bits, signed)
  if activations == "uint8":
    zp = np.uint8(128 if signed else 0)
    lo, hi = -int(zp), 255 - int(zp)
  else:
    if qmax > 127:
      raise ValueError(
          f"export_onnx(activations='int8'): layer {layer} has unsigned {bits}-bit activations "
          f"[0, {qmax}], which signed int8 with zero-point 0 cannot hold; export "
          "activations='uint8', or train with quant.act_bits=7 ([0, 127] fits int8)")
    zp, lo, hi = np.int8(0), -128, 127
  return zp, (None if (qmin, qmax) == (lo, hi) else (qmin, qmax))


def _quant_act(g: _Graph, x: str, layer: str, step: float, bits: int, signed: bool,
               activations: str, qdq: bool, on_integers=None) -> str:
  """The layer's activation fake-quant: ``DequantizeLinear(QuantizeLinear(x))``
  (``qdq``; ``on_integers(name) -> name``: ops on the quantized tensor between the two,
  a Flatten), or the same grid in float ops, ``Round(Clip(x / step)) * step``, for a
  layer whose weights are no int8 grid: ONNX Runtime's default optimizations turn a
  QDQ activation feeding a float-weight conv into an int8 conv with weights
  quantized by the runtime (``WeightBiasQuantization``), which changes the numbers.
  ``layer`` prefixes the names (``{layer}/act/scale``, ...)."""
  scale = g.const(f"{layer}/act/scale", np.float32(step))
  if not qdq:
    qmin, qmax = uniform.int_range(bits, signed)
    v = g.op("Div", [x, scale], f"{layer}/act/scaled")
    v = g.op("Clip", [v, g.const(f"{layer}/act/qmin", np.float32(qmin)),
                      g.const(f"{layer}/act/qmax", np.float32(qmax))], f"{layer}/act/clipped")
    return g.op("Mul", [g.op("Round", [v], f"{layer}/act/rounded"), scale],
                f"{layer}/act/dequantized")
  zp, clip = _act_grid(bits, signed, activations, layer)
  zero = g.const(f"{layer}/act/zero_point", zp)
  if clip is not None:
    x = g.op("Clip", [x, g.const(f"{layer}/act/min", np.float32(clip[0] * step)),
                      g.const(f"{layer}/act/max", np.float32(clip[1] * step))],
             f"{layer}/act/clip")
  q = g.op("QuantizeLinear", [x, scale, zero], f"{layer}/act/quantized")
  if on_integers is not None:
    q = on_integers(q)
  return g.op("DequantizeLinear", [q, scale, zero], f"{layer}/act/dequantized")


def _unpack_bits(g: _Graph, name: str, packed: np.ndarray, bits: int,
                 shape: tuple[int, ...]) -> str:
  """The int32 indices of ``shape`` (the kernel's layout) from layer ``name``'s bytes
  in the packed file, stored as they are there (:func:`repvgg_jax.quant.packed.pack_bits`:
  index i at stream bits ``[i*bits, (i+1)*bits)``, little-endian), decoded by ops on
  constants that the runtime folds at load: a 256-row table gives each byte's fields of
  ``u`` bits (``u = bits`` where it divides 8, else single bits), the stream is cut to
  the kernel's fields, and where ``u = 1 < bits`` each index is the sum of its bits
  times their powers of two, as :func:`~repvgg_jax.quant.packed.unpack_bits` computes it."""
  count = int(np.prod(shape))
  u = bits if 8 % bits == 0 else 1
  table = g.const_once(f"fields_of_byte/{u}_bits",
                       (np.arange(256)[:, None] >> (u * np.arange(8 // u))) & (2 ** u - 1),
                       np.uint8)
  x = g.op("Cast", [g.const(f"{name}/packed", np.asarray(packed, np.uint8))],
           f"{name}/packed_int32", to=g.onnx.TensorProto.INT32)
  x = g.op("Gather", [table, x], f"{name}/fields", axis=0)  # (bytes, 8 / u)
  x = g.op("Reshape", [x, g.const(f"{name}/stream_shape", np.array([-1], np.int64))],
           f"{name}/field_stream")
  x = g.op("Slice", [x, g.const(f"{name}/stream_start", np.array([0], np.int64)),
                     g.const(f"{name}/stream_end", np.array([count * bits // u], np.int64))],
           f"{name}/kernel_fields")
  x = g.op("Cast", [x], f"{name}/fields_int32", to=g.onnx.TensorProto.INT32)
  if u < bits:
    x = g.op("Reshape", [x, g.const(f"{name}/bits_shape", np.array([count, bits], np.int64))],
             f"{name}/bits_per_index")
    x = g.op("Mul", [x, g.const(f"{name}/bit_values", np.left_shift(1, np.arange(bits),
                                                                     dtype=np.int32))],
             f"{name}/bit_values_set")
    x = g.op("ReduceSum", [x, g.const(f"{name}/bits_axis", np.array([1], np.int64))],
             f"{name}/index_stream", keepdims=0)
  return g.op("Reshape", [x, g.const(f"{name}/index_shape", np.array(shape, np.int64))],
              f"{name}/indices_packed_layout")


# Our kernels' axes -> ONNX's (output channels first): HWIO -> OIHW, (in, out) -> (out, in).
LAYOUTS = {"conv": (3, 2, 0, 1), "dense": (1, 0)}


def _int8_grid(graph: Graph, layer: Layer) -> bool:
  """Whether the layer's kernel is a codebook on a per-channel int8 grid (int8 weights
  and QDQ activations in the graph)."""
  entry = graph.quantized(layer)
  return entry is not None and "int_scale" in entry


def _weight(g: _Graph, graph: Graph, layer: Layer,
            activations: str) -> tuple[str, np.ndarray | None]:
  """The float weight tensor of the layer's kernel in ONNX's layout: ``(name, per-channel
  int8 scale or None)``."""
  name, entry, layout = layer.kernel, graph.quantized(layer), LAYOUTS[layer.kind]
  if _int8_grid(graph, layer):
    k, scale = graph.int8_weights(layer)
    if activations == "int8" and k.min() == -128:
      raise ValueError(f"export_onnx(activations='int8'): {name} has an int8 level at -128; "
                       "TensorRT's explicit quantization wants [-127, 127] (quantize with "
                       "cluster int8_levels=True, whose grid is narrow, or export "
                       "activations='uint8')")
    w = g.const(f"{name}/int8", k.transpose(layout))
    s = g.const(f"{name}/scale", scale)
    zero = g.const(f"{name}/zero_point", np.zeros(scale.shape, np.int8))
    return g.op("DequantizeLinear", [w, s, zero], f"{name}/dequantized", axis=0), scale
  if entry is not None:
    d = entry.get("cluster_dim", 1)
    shape = index_shape(entry["shape"], d)  # the kernel's, one index per d-vector
    indices = g.op("Transpose", [_unpack_bits(g, name, entry["packed"], entry["bits"], shape)],
                   f"{name}/indices", perm=list(layout))  # a vector's: (O, I / d, ...)
    c = np.asarray(entry["codebook"], np.float32)  # one row per group of output channels
    if c.ndim == (3 if d > 1 else 2):  # output channel o reads row o // group_size
      rows = np.arange(entry["shape"][-1], dtype=np.int32) // entry.get("group_size", 1)
      offsets = (rows * c.shape[1]).reshape((-1,) + (1,) * (len(shape) - 1))
      indices = g.op("Add", [indices, g.const(f"{name}/row_offsets", offsets)],
                     f"{name}/flat_indices")
      c = c.reshape((-1, d) if d > 1 else -1)
    w = g.op("Gather", [g.const(f"{name}/codebook", c), indices], f"{name}/decoded", axis=0)
    if d > 1:  # (O, I / d, *spatial, d) -> (O, I / d, d, *spatial) -> (O, I, *spatial)
      n = len(shape)
      w = g.op("Transpose", [w], f"{name}/vectors_in_place", perm=[0, 1, n, *range(2, n)])
      out = np.array(entry["shape"], np.int64)[list(layout)]
      w = g.op("Reshape", [w, g.const(f"{name}/shape", out)], f"{name}/kernel")
    return w, None
  return g.const(name, np.asarray(graph.kernel(layer)).transpose(layout)), None


def _bias(g: _Graph, name: str, bias: np.ndarray, act_step: float | None,
          w_scale: np.ndarray | None) -> str:
  """The int32 bias of the integer forward (:func:`int32_bias`) behind a
  DequantizeLinear where activations and weights are both quantized (what ONNX
  Runtime's QDQ conv fusion and TensorRT expect), else float."""
  if act_step is None or w_scale is None:
    return g.const(name, bias.astype(np.float32))
  q, scale = int32_bias(bias, act_step, w_scale)
  return g.op("DequantizeLinear", [g.const(f"{name}/int32", q),
                                   g.const(f"{name}/scale", scale),
                                   g.const(f"{name}/zero_point", np.zeros(scale.shape, np.int32))],
              f"{name}/dequantized", axis=0)


def _squeeze_excite(g: _Graph, x: str, p: dict, name: str) -> str:
  """Float SE of ``repvgg_jax.models.repvgg.SqueezeExcite`` on an NCHW tensor."""
  s = g.op("GlobalAveragePool", [x], f"{name}/pool")
  for part, act in (("down", "Relu"), ("up", "Sigmoid")):
    k = np.asarray(p[part]["kernel"], np.float32).T[:, :, None, None]
    s = g.op("Conv", [s, g.const(f"{name}/{part}/kernel", k),
                      g.const(f"{name}/{part}/bias", np.asarray(p[part]["bias"], np.float32))],
             f"{name}/{part}")
    s = g.op(act, [s], f"{name}/{part}/{act.lower()}")
  return g.op("Mul", [x, s], f"{name}/scaled")


def _check_integer_pool(graph: Graph, layer: Layer) -> None:
  """ValueError naming the layer where ONNX Runtime's QLinearGlobalAveragePool would
  refuse its requantization ``pool_step / (act_step * pixels)`` (it takes [2^-32, 256):
  at one pixel, a pool step 256 times the pooled vector's step or more)."""
  if layer.act_step is None:
    raise ValueError(f"export_onnx: layer {layer.name} quantizes the map it pools but not "
                     "the pooled vector (pool_step without act_step)")
  ratio = np.float32(layer.pool_step) / np.float32(layer.act_step)
  if not 2.0 ** -32 <= ratio < 256:
    raise ValueError(f"export_onnx: layer {layer.name}: pool step / input step = "
                     f"{float(ratio):g}, outside the range [2^-32, 256) of ONNX Runtime's "
                     "QLinearGlobalAveragePool requantization")


def _not_integer(graph: Graph, layer: Layer) -> str | None:
  """Why ONNX Runtime cannot run ``layer`` as integer ops (QLinearConv, QGemm), or None."""
  entry = graph.quantized(layer)
  if layer.act_step is None:
    return "its input is float (act_bits=0)"
  if entry is None:
    return "its kernel is float (not quantized)"
  if "int_scale" not in entry:
    return ("its kernel is a codebook off the int8 grid, decoded to float (quantize with "
            "int8_levels=True, or method 'uniform' / 'lsq')")
  if layer.se is not None:
    return "its squeeze-excite runs in float"
  return None


def _input(g: _Graph, graph: Graph, layer: Layer | None, activations: str) -> str:
  """The uint8 NHWC ``images`` as the first layer's input, NCHW: normalized floats (the
  ``Transpose`` moves the 8-bit image, before the ``Cast``); or, given the first ``layer``
  (an integer-weight one, whose input is quantized), its quantized input, looked up: a
  pixel's value on the grid depends on its channel and value alone, so one ``Gather`` from
  a 768-entry table (:func:`~repvgg_jax.deploy.integer.input_integers` times the step: the
  integer forward's own numbers) replaces the normalization's float ops before the
  ``QuantizeLinear``. A gray image's channel is repeated (by ``Expand``, or by
  broadcasting against the per-channel table offsets)."""
  onnx = g.onnx
  if layer is None:
    x = g.op("Expand", ["images", g.const("rgb_shape", np.array([1, 1, 1, 3], np.int64))],
             "images_rgb")
    x = g.op("Transpose", [x], "images_nchw", perm=[0, 3, 1, 2])
    x = g.op("Cast", [x], "images_float", to=onnx.TensorProto.FLOAT)
    x = g.op("Mul", [x, g.const("inv_255", np.float32(1 / 255))], "images_01")
    stats = {k: np.asarray(getattr(graph, k), np.float32).reshape(1, 3, 1, 1)
             for k in ("mean", "std")}
    x = g.op("Sub", [x, g.const("mean", stats["mean"])], "images_centred")
    return g.op("Div", [x, g.const("std", stats["std"])], "images_normalized")
  x = g.op("Transpose", ["images"], "images_nchw", perm=[0, 3, 1, 2])
  x = g.op("Cast", [x], "images_int32", to=onnx.TensorProto.INT32)
  x = g.op("Add", [x, g.const("channel_offsets", np.array([0, 256, 512], np.int32).reshape(
      1, 3, 1, 1))], "images_table_index")
  step = np.float32(layer.act_step)
  table = input_integers(graph, layer.act_step, layer.act_signed) * step
  x = g.op("Gather", [g.const(f"{layer.name}/act/table", table.reshape(-1)), x],
           f"{layer.name}/act/looked_up")
  return _quant_act(g, x, layer.name, layer.act_step, graph.act_bits, layer.act_signed,
                    activations, True)


def export_onnx(packed: PackedModel | Graph, path=None, *, activations: str = "uint8",
                opset: int = OPSET, integer: bool = False):
  """The packed model (or its deploy graph) as an ONNX ``ModelProto`` (see the module
  doc); written atomically to ``path`` when given. Input ``images``: uint8 ``(N, H, W, 1
  or 3)``; output ``logits``: float32 ``(N, num_classes)``. ``integer=True`` asks for a
  graph that ONNX Runtime runs as integer ops throughout: a layer that cannot be is a
  ValueError naming it and why, before anything is written."""
  onnx = _import_onnx()
  check_activations(activations, 0)
  graph = packed if isinstance(packed, Graph) else deploy_graph(packed)
  if integer:  # (a pool ONNX Runtime cannot requantize is refused below, for every export)
    for layer in graph.layers:
      why = _not_integer(graph, layer)
      if why is not None:
        raise ValueError(f"export_onnx(integer=True): layer {layer.name} cannot run as "
                         f"integer ops in ONNX Runtime: {why}")
  bits = graph.act_bits

  g = _Graph(onnx)
  first = graph.layers[0]
  looked_up = first.act_step is not None and not first.pool and _int8_grid(graph, first)
  x = _input(g, graph, first if looked_up else None, activations)

  for i, layer in enumerate(graph.layers):
    qdq = _int8_grid(graph, layer)
    on_integers = None  # the Flatten of a pooled map, where it goes on the quantized tensor
    if layer.pool:
      if layer.pool_step is not None:
        # Conv -> Relu -> Q -> DQ -> GlobalAveragePool -> Q -> Flatten -> DQ -> Gemm: ONNX
        # Runtime runs QLinearConv, QLinearGlobalAveragePool and an integer Gemm.
        _check_integer_pool(graph, layer)
        x = _quant_act(g, x, f"{layer.name}/pool", layer.pool_step, bits, False, activations,
                       qdq)
      x = g.op("GlobalAveragePool", [x], f"{layer.name}/pool")

      def flatten(v, name=f"{layer.name}/pooled"):
        return g.op("Flatten", [v], name)
      if layer.act_step is None or not qdq:
        x = flatten(x)
      else:
        on_integers = flatten
    if layer.act_step is not None and not (i == 0 and looked_up):
      x = _quant_act(g, x, layer.name, layer.act_step, bits, layer.act_signed, activations,
                     qdq, on_integers)
    w, w_scale = _weight(g, graph, layer, activations)
    if layer.kind == "conv":
      bias = _bias(g, f"{layer.kernel.rsplit('/', 1)[0]}/bias", layer.bias, layer.act_step,
                   w_scale)
      p = layer.padding
      kh, kw = graph.kernel_shape(layer)[:2]
      x = g.op("Conv", [x, w, bias], f"{layer.name}/conv", kernel_shape=[kh, kw],
               pads=[p, p, p, p], strides=[layer.strides, layer.strides], group=layer.groups)
      if layer.se is not None:
        x = _squeeze_excite(g, x, layer.se, f"{layer.name}/se")
    else:
      x = g.op("Gemm", [x, w, _bias(g, f"{layer.name}/bias", layer.bias, layer.act_step,
                                    w_scale)], f"{layer.name}/gemm", transB=1)
    if layer.relu:
      x = g.op("Relu", [x], f"{layer.name}/relu")
  g.nodes[-1].output[0] = "logits"

  size, classes = graph.image_size, graph.num_classes
  onnx_graph = onnx.helper.make_graph(
      g.nodes, "repvgg_jax", [onnx.helper.make_tensor_value_info(
          "images", onnx.TensorProto.UINT8, ["N", size, size, "C"])],
      [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", classes])],
      g.inits)
  proto = onnx.helper.make_model(onnx_graph,
                                 opset_imports=[onnx.helper.make_opsetid("", opset)],
                                 producer_name="repvgg-jax")
  # The oldest IR version of the opset: runtimes older than this onnx package read it.
  proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import))
  onnx.checker.check_model(proto, full_check=True)
  if path is not None:
    atomic_write_bytes(path, proto.SerializeToString())
  return proto

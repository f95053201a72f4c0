"""Core ML export of the packed model: an ML program (``.mlpackage``) for iOS 18 / macOS 15.

:func:`export_coreml` writes the network that :func:`repvgg_jax.load_packed` runs,
built op by op with the coremltools MIL builder (no tracing, no torch): images in,
NHWC ``(batch_size, H, W, channels)`` with pixel values 0..255, float32 ``logits``
out; the transpose to Core ML's NCHW, the cast and the input normalization are
inside the program. Core ML's multi-array inputs have no uint8 type (float32,
float16, double, int32; int8 from iOS 26 on), so the input ``images`` is int32
holding the uint8 pixels; a gray image (``channels=1``) is tiled to RGB as
``load_packed`` repeats it.

* Weights: every quantized kernel (first conv, blocks, head) is one iOS 18
  ``constexpr_lut_to_dense`` of *our* per-output-channel codebook (float32 LUT)
  and *our* indices from the packed file: nothing re-clustered or re-quantized, the
  decoded kernel is the packed file's, bit for bit. A vector codebook
  (``cluster_dim=d``) is Core ML's vector palettization: a LUT of d-vectors, each
  index filling d consecutive input channels (``vector_axis=1``). Core ML's LUTs have 2^n entries
  for n in {1, 2, 3, 4, 6, 8}; our ``b``-bit codebooks map to the smallest that
  holds them: b in {1, 2, 3, 4, 6, 8} as is, 5 -> a 6-bit LUT, 7 -> an 8-bit LUT,
  the table padded with copies of the last level that no index selects. A
  per-output-channel codebook is a LUT of shape ``(O, 1, 1, 1, 2^n, 1)`` against
  the ``(O, I / groups, 3, 3)`` conv weight (grouped convs: the same rule, the
  palette per output channel), ``(O, 1, 2^n, 1)`` against the head's ``(O, I)``;
  a per-tensor codebook has ones in place of ``O``. The first and last layers, stored at
  ``first_last_bits`` (8) like every other layer (indices + codebook), are 8-bit
  LUTs; a kernel the packed file keeps as float is a plain float32 const.
* Activations (``act_bits``): the input of every conv and of the head, and the map
  the head's pool averages (a layer's ``pool_step``), go through
  ``quantize -> dequantize`` at *our* step (zero-point 0): ``uint8`` for the
  unsigned post-ReLU inputs, ``int8`` for a signed input, the image's (Core ML's
  quantize takes int8 with zero-point 0, which holds the signed 8-bit grid
  [-128, 127] exactly). Below 8 bits a ``clip`` to the grid's range comes first
  (quantize saturates only at the type's range).
* Bias, SE (D2se: pool, 1x1 convs, sigmoid, multiply), ReLU, pooling and the head
  stay float32; the program is converted at ``compute_precision=FLOAT32`` (no
  float16 casts of the LUTs or activations) and with coremltools' graph passes off
  (``PassPipeline.EMPTY``): the package holds the ops written here (the default passes
  would, for one, turn the division by ``std`` into a multiplication by its inverse).

Core ML's runtime (``MLModel.predict``) exists only on macOS, so no predictions of
the exported package are run on Linux. What the tests verify instead, reading the
saved package back: every conv and the head carry one LUT op whose LUT and indices,
decoded with numpy, equal the packed file's decoded kernel bit for bit; 5-bit LUTs
are 64 long and never indexed past 31; every quantize op's scale is the layer's
activation step (float32, bit for bit); SE and grouped variants export; the write
is atomic.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

import numpy as np

from repvgg_jax.deploy.graph import Graph, deploy_graph
from repvgg_jax.quant import uniform
from repvgg_jax.quant.packed import PackedModel

SUFFIX = ".mlpackage"
# Our codebook bits -> the bits of the Core ML LUT that holds them (2^n entries).
LUT_BITS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 6, 7: 8, 8: 8}


def available() -> bool:
  """Whether a Core ML package can be written here (coremltools imports)."""
  return importlib.util.find_spec("coremltools") is not None


def _import_coremltools():
  try:
    import coremltools as ct
  except ImportError as e:
    raise ImportError("export_coreml needs coremltools: pip install 'repvgg-jax[coreml]'") from e
  return ct


def lut_table(codebook: np.ndarray, bits: int) -> np.ndarray:
  """``(..., 2^bits, d)`` float32 codebook of d-vectors -> ``(..., 2^LUT_BITS[bits], d)``:
  padded with copies of the last entry (entries no ``bits``-bit index reaches)."""
  c = np.asarray(codebook, np.float32)
  pad = 2 ** LUT_BITS[bits] - c.shape[-2]
  if pad:
    c = np.concatenate([c, np.repeat(c[..., -1:, :], pad, axis=-2)], axis=-2)
  return c


def _index_array(idx: np.ndarray, bits: int) -> np.ndarray:
  """Our ``bits``-bit indices as the index array of a ``LUT_BITS[bits]``-bit LUT
  (coremltools' sub-byte dtypes below 8 bits: the package stores them packed)."""
  from coremltools.converters.mil.mil import types
  n = LUT_BITS[bits]
  dtype = np.uint8 if n == 8 else getattr(types, f"np_uint{n}_dtype")
  return np.ascontiguousarray(idx).astype(dtype)


def _weight(mb, packed: PackedModel, path: str, layout: tuple[int, ...], name: str):
  """The weight of kernel ``path`` in Core ML's layout (``layout`` transposes ours,
  output channels last, to output channels first): a LUT op of our codebook and
  indices, or a float32 const for a float kernel."""
  layer = packed.layers.get(path)
  if layer is None:
    key = f"params/{path}"
    if key not in packed.floats:
      raise ValueError(f"export_coreml: the packed model has no kernel {path}")
    return np.ascontiguousarray(np.asarray(packed.floats[key], np.float32).transpose(layout))
  bits, d = int(layer["bits"]), layer.get("cluster_dim", 1)
  if bits not in LUT_BITS:
    raise ValueError(f"export_coreml: layer {path} has {bits}-bit indices; Core ML LUTs hold "
                     "at most 8 bits")
  idx = packed.indices(path).transpose(layout)  # a vector's index: (O, I / d, ...)
  stored = np.asarray(layer["codebook"], np.float32)
  # (..., K, 1): Core ML's scalar LUT is a LUT of 1-vectors; padded to its 2^n entries.
  table = lut_table(stored if d > 1 else stored[..., None], bits)
  if table.ndim == 3:  # per group of output channels (a group of 1: per channel): one
    # palette per group of rows of the weight (Core ML's per_grouped_channel LUT: each LUT
    # dimension divides the weight's)
    if table.shape[0] * layer.get("group_size", 1) != idx.shape[0]:
      raise ValueError(f"export_coreml: layer {path} has a codebook of shape {stored.shape} "
                       f"(group size {layer.get('group_size', 1)}) for {idx.shape[0]} output "
                       "channels")
    lut = table.reshape((table.shape[0],) + (1,) * (idx.ndim - 1) + table.shape[-2:])
  elif table.ndim == 2:
    lut = table.reshape((1,) * idx.ndim + table.shape[-2:])
  else:
    raise ValueError(f"export_coreml: layer {path} has a codebook of shape {stored.shape}; "
                     "expected (K,) or (Cout, K), or (K, d) or (Cout, K, d) for vectors")
  if d > 1:  # each index fills d consecutive input channels (axis 1 of O, I, ...)
    return mb.constexpr_lut_to_dense(indices=_index_array(idx, bits), lut=lut, vector_axis=1,
                                     name=name)
  return mb.constexpr_lut_to_dense(indices=_index_array(idx, bits), lut=lut, name=name)


def _quant_act(mb, x, layer: str, step: np.float32, bits: int, signed: bool):
  """``dequantize(quantize(x))`` at ``step``, zero-point 0: int8 for a signed grid,
  uint8 for an unsigned one; clipped to the grid first below 8 bits."""
  qmin, qmax = uniform.int_range(bits, signed)
  if bits < 8:
    x = mb.clip(x=x, alpha=np.float32(qmin * step), beta=np.float32(qmax * step),
                name=f"{layer}_act_clip")
  dtype = "int8" if signed else "uint8"
  zero = np.int8(0) if signed else np.uint8(0)
  q = mb.quantize(input=x, scale=step, zero_point=zero, output_dtype=dtype,
                  name=f"{layer}_act_quantized")
  return mb.dequantize(input=q, scale=step, zero_point=zero, name=f"{layer}_act_dequantized")


def _squeeze_excite(mb, x, p: dict, name: str):
  """Float SE of ``repvgg_jax.models.repvgg.SqueezeExcite`` on an NCHW tensor."""
  s = mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True, name=f"{name}_pool")
  for part, act in (("down", mb.relu), ("up", mb.sigmoid)):
    k = np.ascontiguousarray(np.asarray(p[part]["kernel"], np.float32).T[:, :, None, None])
    s = mb.conv(x=s, weight=k, bias=np.asarray(p[part]["bias"], np.float32),
                name=f"{name}_{part}")
    s = act(x=s, name=f"{name}_{part}_act")
  return mb.mul(x=x, y=s, name=f"{name}_scaled")


def _atomic_save(model, path: str) -> None:
  """``model.save`` to a sibling temporary package, then swapped in for ``path`` (the
  old package renamed aside and deleted after): ``path`` is never half-written."""
  parent = os.path.dirname(os.path.abspath(path))
  base = os.path.basename(path)[:-len(SUFFIX)]
  tmp = os.path.join(parent, f"{base}.tmp-{os.getpid()}{SUFFIX}")
  old = os.path.join(parent, f"{base}.old-{os.getpid()}{SUFFIX}")
  for p in (tmp, old):
    if os.path.lexists(p):
      shutil.rmtree(p)
  try:
    model.save(tmp)
    if os.path.lexists(path):
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  finally:
    if os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


# Our kernels' axes -> Core ML's (output channels first): HWIO -> OIHW, (in, out) -> (out, in).
LAYOUTS = {"conv": (3, 2, 0, 1), "dense": (1, 0)}


def export_coreml(packed: PackedModel | Graph, path, *, batch_size: int = 1, channels: int = 3):
  """The packed model (or its deploy graph) as a Core ML ML program (see the module doc),
  written atomically to ``path`` (a ``.mlpackage`` directory); returns the coremltools
  ``MLModel`` (not loaded: Core ML's runtime is macOS-only). Input ``images``: int32
  ``(batch_size, H, W, channels)`` pixel values 0..255, ``channels`` 1 or 3; output
  ``logits``: float32 ``(batch_size, num_classes)``."""
  path = os.fspath(path)
  if not path.endswith(SUFFIX):
    raise ValueError(f"export_coreml: path {path!r} must end in {SUFFIX!r} (an ML program "
                     "package)")
  if channels not in (1, 3):
    raise ValueError(f"export_coreml: channels={channels!r}: expected 1 or 3")
  if not (isinstance(batch_size, int) and batch_size >= 1):
    raise ValueError(f"export_coreml: batch_size={batch_size!r}: expected an int >= 1")
  ct = _import_coremltools()
  from coremltools.converters.mil import Builder as mb
  from coremltools.converters.mil.mil import types

  graph = packed if isinstance(packed, Graph) else deploy_graph(packed)
  bits, size = graph.act_bits, graph.image_size
  mean = np.asarray(graph.mean, np.float32).reshape(1, 3, 1, 1)
  std = np.asarray(graph.std, np.float32).reshape(1, 3, 1, 1)

  @mb.program(input_specs=[mb.TensorSpec(shape=(batch_size, size, size, channels),
                                         dtype=types.int32)],
              opset_version=ct.target.iOS18)
  def prog(images):
    x = mb.cast(x=images, dtype="fp32", name="images_float")
    if channels == 1:
      x = mb.tile(x=x, reps=[1, 1, 1, 3], name="images_rgb")
    x = mb.transpose(x=x, perm=[0, 3, 1, 2], name="images_nchw")
    x = mb.mul(x=x, y=np.float32(1 / 255), name="images_01")
    x = mb.sub(x=x, y=mean, name="images_centred")
    x = mb.real_div(x=x, y=std, name="images_normalized")
    last = graph.layers[-1]
    for layer in graph.layers:
      if layer.pool:
        if layer.pool_step is not None:  # the map's fake-quant before the mean
          x = _quant_act(mb, x, f"{layer.name}_pool", layer.pool_step, bits, False)
        x = mb.reduce_mean(x=x, axes=[2, 3], keep_dims=False, name=f"{layer.name}_pooled")
      if layer.act_step is not None:
        x = _quant_act(mb, x, layer.name, layer.act_step, bits, layer.act_signed)
      w = _weight(mb, graph.packed, layer.kernel, LAYOUTS[layer.kind],
                  layer.kernel.replace("/", "_"))
      out = "logits" if layer is last and not layer.relu else None
      if layer.kind == "conv":
        p = layer.padding
        x = mb.conv(x=x, weight=w, bias=layer.bias, strides=[layer.strides, layer.strides],
                    pad_type="custom", pad=[p, p, p, p], groups=layer.groups,
                    name=out or f"{layer.name}_conv")
        if layer.se is not None:
          x = _squeeze_excite(mb, x, layer.se, f"{layer.name}_se")
      else:
        x = mb.linear(x=x, weight=w, bias=layer.bias, name=out or f"{layer.name}_linear")
      if layer.relu:
        x = mb.relu(x=x, name="logits" if layer is last else f"{layer.name}_relu")
    return x

  mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True,
                       pass_pipeline=ct.PassPipeline.EMPTY)
  _atomic_save(mlmodel, path)
  return mlmodel

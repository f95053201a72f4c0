"""The deployed network as one description: what every runtime and exporter walks.

A packed file (:class:`repvgg_jax.quant.packed.PackedModel`) holds weights and a free
``model`` dict; :func:`deploy_graph` turns the two into a :class:`Graph`: the input
normalization and an ordered list of :class:`Layer` s, each a conv or dense layer with
everything a runtime needs to compute it (the kernel's path in the packed file, bias,
stride, groups, padding, the step and sign of its input's fake-quant, an SE after it, a
ReLU, a global pool before it). The JAX runtime (:mod:`repvgg_jax.deploy.runtime`), the
integer forward, StableHLO, ONNX and Core ML are each one loop over ``graph.layers``:
none knows RepVGG's stages or which layer reads the signed image.

The network family's knowledge lives in one function per family (``FAMILIES``): for
RepVGG, :func:`repvgg_layers` reads the layer list of the deploy model. Another family
(MobileOne's depthwise + pointwise pairs, say) would add its model, its merge and its
``*_layers`` function (a depthwise conv is a conv layer with ``groups`` = channels, a
pointwise one a 1x1 conv layer); no exporter changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from repvgg_jax.models.repvgg import SIGNED_INPUT_LAYER, RepVGG, Variant
from repvgg_jax.quant import uniform
from repvgg_jax.quant.packed import PackedModel

KINDS = ("conv", "dense")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One weighted layer of the deployed network, in the order the network runs them.

  ``kind`` "conv" (NHWC input, HWIO kernel, ``padding`` zeros on each side, then
  ``se`` if given) or "dense" (``(N, C)`` input, ``(C, O)`` kernel; ``pool`` first
  averages the NHWC input over its spatial axes). ``kernel``: the kernel's path in the
  packed file's params (a quantized layer or a float leaf). ``act_step``: the float32
  step of the input's fake-quant at the graph's ``act_bits`` (None: float input),
  ``act_signed`` whether that grid is signed. ``se``: float squeeze-excite variables
  ``{"down": {kernel, bias}, "up": {kernel, bias}}`` applied to the conv's output.
  ``pool_step``: the float32 step of the unsigned fake-quant of the map that ``pool``
  averages, at the graph's ``act_bits`` (None: the pool averages the float map), so an
  integer runtime pools integers: quantize the map, average, then ``act_step``.
  """
  name: str
  kind: str
  kernel: str
  bias: np.ndarray
  strides: int = 1
  groups: int = 1
  padding: int = 0
  act_step: np.float32 | None = None
  act_signed: bool = False
  se: Mapping[str, Any] | None = None
  relu: bool = False
  pool: bool = False
  pool_step: np.float32 | None = None


@dataclasses.dataclass(frozen=True)
class Graph:
  """The deployed network: uint8 NHWC images of ``image_size`` (1 or 3 channels,
  repeated to 3) normalized by ``mean``/``std``, then ``layers``; ``act_bits`` (0:
  float activations) is the width of every layer's input grid; ``packed`` holds the
  weights the layers name."""
  layers: tuple[Layer, ...]
  act_bits: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int
  packed: PackedModel

  def kernel(self, layer: Layer, xp: Any = np):
    """The layer's float32 kernel (decoded from its codebook, or the stored float)."""
    if layer.kernel in self.packed.layers:
      return self.packed.kernel(layer.kernel, xp)
    return xp.asarray(self.packed.floats[f"params/{layer.kernel}"], xp.float32)

  def kernel_shape(self, layer: Layer) -> tuple[int, ...]:
    """The layer's kernel shape: ``(kh, kw, Cin / groups, Cout)`` or ``(Cin, Cout)``."""
    entry = self.quantized(layer)
    if entry is not None:
      return tuple(entry["shape"])
    return tuple(np.shape(self.packed.floats[f"params/{layer.kernel}"]))

  def quantized(self, layer: Layer) -> dict[str, Any] | None:
    """The packed entry of the layer's kernel (bits, codebook, ...), None for a float one."""
    return self.packed.layers.get(layer.kernel)

  def int8_weights(self, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """(int8 kernel, float32 per-output-channel scale) of a layer whose levels are
    ``scale x int8`` (``quant.int8_levels``, uniform, LSQ); ValueError naming it otherwise."""
    entry = self.quantized(layer)
    if entry is None or "int_scale" not in entry:
      raise ValueError(f"integer inference: layer {layer.kernel} has no int8 grid (quantize "
                       "it with quant.int8_levels=True, or a uniform or lsq quantizer, at "
                       "<= 8 bits)")
    w = np.asarray(self.packed.kernel(layer.kernel), np.float64)
    scale = np.broadcast_to(np.asarray(self.packed.int_scale(layer.kernel), np.float64),
                            w.shape[-1:])
    k = np.rint(w / scale)
    if k.min() < -128 or k.max() > 127 or np.abs(k * scale - w).max() > 1e-5 * np.abs(w).max():
      raise ValueError(f"integer inference: the levels of {layer.kernel} are not scale x int8")
    return k.astype(np.int8), scale.astype(np.float32)

  def replace(self, **changes: Any) -> "Graph":
    return dataclasses.replace(self, **changes)


# What a packed file's ``model`` dict must hold, for every family.
DESCRIPTION = ("num_classes", "act_bits", "image_size", "mean", "std")
REPVGG_DESCRIPTION = ("blocks", "widths", "groups", "se", "cifar_stem")


def model_description(model: RepVGG, *, image_size: int, mean: Any, std: Any,
                      **extra: Any) -> dict[str, Any]:
  """The ``model`` metadata of a packed file: enough to rebuild ``model``'s deploy
  graph and feed it uint8 images (``extra``: e.g. the dataset name)."""
  v = model.variant
  return {"blocks": list(v.blocks), "widths": [float(w) for w in v.widths],
          "groups": v.groups, "se": v.se, "num_classes": model.num_classes,
          "cifar_stem": model.cifar_stem, "act_bits": model.act_bits,
          "image_size": int(image_size), "mean": [float(m) for m in mean],
          "std": [float(s) for s in std], **extra}


def repvgg_model(desc: Mapping[str, Any]) -> RepVGG:
  """The deploy-form RepVGG a packed file's ``model`` dict describes."""
  variant = Variant(tuple(desc["blocks"]), tuple(desc["widths"]), desc["groups"], desc["se"])
  return RepVGG(variant, num_classes=desc["num_classes"], deploy=True,
                cifar_stem=desc["cifar_stem"], act_bits=desc["act_bits"], conv_impl="xla")


def _step(floats: Mapping[str, np.ndarray], path: str) -> np.float32:
  """The float32 step a learned step variable stands for, as the forward computes it."""
  return np.float32(np.asarray(uniform.learned_step(np.asarray(floats[path], np.float32))))


def repvgg_layers(desc: Mapping[str, Any], floats: Mapping[str, np.ndarray]) -> list[Layer]:
  """RepVGG's deploy network: one 3x3 conv (+ SE) + ReLU a block, stem first (its input,
  the normalized image, is the one signed activation), then the pooled dense head (its
  pool's map quantized by ``pool_act``; a file packed before ``pool_act`` existed pools
  the float map)."""
  bits = desc["act_bits"]

  def act(name: str) -> np.float32 | None:
    return _step(floats, f"quant/{name}/step") if bits else None

  def params(prefix: str) -> dict:
    out: dict = {}
    for k, v in floats.items():
      if k.startswith(prefix):
        node = out
        *parents, leaf = k[len(prefix):].split("/")
        for p in parents:
          node = node.setdefault(p, {})
        node[leaf] = np.asarray(v, np.float32)
    return out

  layers = []
  for b in repvgg_model(desc).layers():
    layers.append(Layer(
        name=b.name, kind="conv", kernel=f"{b.name}/reparam_conv/kernel",
        bias=np.asarray(floats[f"params/{b.name}/reparam_conv/bias"], np.float32),
        strides=b.strides, groups=b.groups, padding=1, act_step=act(f"{b.name}/act"),
        act_signed=b.name == SIGNED_INPUT_LAYER,
        se=params(f"params/{b.name}/se/") if desc["se"] else None, relu=True))
  layers.append(Layer(name="head", kind="dense", kernel="head/kernel",
                      bias=np.asarray(floats["params/head/bias"], np.float32),
                      act_step=act("head_act"), pool=True,
                      pool_step=act("pool_act") if "quant/pool_act/step" in floats else None))
  return layers


FAMILIES: dict[str, tuple[tuple[str, ...], Callable[..., list[Layer]]]] = {
    "repvgg": (REPVGG_DESCRIPTION, repvgg_layers)}


def deploy_graph(packed: PackedModel, source: str = "packed model") -> Graph:
  """The :class:`Graph` of a packed model; a ValueError naming ``source`` and what its
  description lacks."""
  desc = packed.model
  family = desc.get("family", "repvgg")  # files name another family; RepVGG's need not
  if family not in FAMILIES:
    raise ValueError(f"{source}: model family {family!r} not in {sorted(FAMILIES)}")
  fields, layers_of = FAMILIES[family]
  missing = [k for k in DESCRIPTION + fields if k not in desc]
  if missing:
    raise ValueError(f"{source} does not describe its model (missing {missing}); export it "
                     "again with repvgg_jax.deploy.model_description(...)")
  try:
    layers = layers_of(desc, packed.floats)
  except KeyError as e:
    raise ValueError(f"{source}: the packed model lacks {e.args[0]}, which its "
                     "description calls for") from None
  for layer in layers:
    if layer.kernel not in packed.layers and f"params/{layer.kernel}" not in packed.floats:
      raise ValueError(f"{source}: the packed model has no kernel {layer.kernel}")
  return Graph(tuple(layers), int(desc["act_bits"]), int(desc["image_size"]),
               tuple(float(m) for m in desc["mean"]), tuple(float(s) for s in desc["std"]),
               int(desc["num_classes"]), packed)

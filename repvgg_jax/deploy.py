"""Deployment: activation calibration, the self-contained packed model, StableHLO.

* :func:`calibrate`: activation steps of a deploy model with ``act_bits``
  from a few batches (min-max, percentile or MSE).
* :func:`describe`: what the packed file records about its network (variant
  structure, classes, input size and normalization, activation bits), so that
  :func:`load_packed` needs no config.
* :func:`load_packed`: a packed file -> :class:`DeployedModel`, callable on a
  batch of uint8 NHWC images, returning float32 logits.
* :func:`integer_forward_fn`: the same network in integer arithmetic: int8
  activations x int8 weights -> int32 convolutions, then a float
  requantization (every weight codebook on a per-channel int8 grid).
* :func:`export_stablehlo`: the same forward serialized with ``jax.export``:
  the packed low-bit bytes are constants of the program and are decoded inside
  it, so the file is about the packed file's size and runs with
  ``jax.export.deserialize(...).call(images)`` where repvgg_jax is not installed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repvgg_jax.data.transforms import normalize
from repvgg_jax.fileio import atomic_write
from repvgg_jax.models.repvgg import SIGNED_INPUT_LAYER, RepVGG, Variant
from repvgg_jax.quant import activation, uniform
from repvgg_jax.quant.export import PackedModel, read_packed, unpack_bits
from repvgg_jax.quant.levels import decode


def normalize_images(images: jax.Array, mean: Any, std: Any) -> jax.Array:
  """uint8 NHWC (C = 1 or 3) -> float32 NHWC with 3 channels: the input
  pipeline's normalization (:func:`repvgg_jax.data.transforms.normalize`)."""
  images = jnp.asarray(images)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return normalize(images, mean, std)


def calibrate(model: RepVGG, variables: Mapping[str, Any], batches: Iterable[jax.Array], *,
              method: str = "minmax", percentile: float = 99.99) -> dict[str, Any]:
  """The ``quant`` collection of ``variables`` (``{}`` if it has none) plus the
  activation steps of a deploy model with ``act_bits``, calibrated on float NHWC
  ``batches`` (normalized images).

  ``variables["params"]`` are the (weight-quantized) params; activations are
  observed in float everywhere, and each layer's step is set from what its
  input looked like over all batches (``stem/act/step``, ...,
  ``head_act/step``).
  """
  if not model.act_bits:
    raise ValueError("calibrate: the model has act_bits=0 (float activations)")
  activation.check_calibration(method, percentile)
  params = {"params": variables["params"]}

  @jax.jit
  def observe(x):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
    quant = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["quant"])
    _, out = model.apply({**params, "quant": quant}, x, mutable=["intermediates"])
    return out["intermediates"]

  max_abs: dict[tuple, float] = {}
  samples: dict[tuple, list] = {}
  for x in batches:
    flat = traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(observe(x))))
    for path, (v,) in flat.items():
      layer = path[:-1]
      if path[-1] == "max_abs":
        max_abs[layer] = max(max_abs.get(layer, 0.0), float(v))
      else:
        samples.setdefault(layer, []).append(np.asarray(v))
  if not max_abs:
    raise ValueError("calibrate: no calibration batches")
  steps = traverse_util.flatten_dict(flax.core.unfreeze(variables.get("quant", {})))
  for layer in max_abs:
    signed = layer[0] == SIGNED_INPUT_LAYER
    steps[layer + ("step",)] = activation.calibrated_step(
        max_abs[layer], np.concatenate(samples[layer]), model.act_bits, signed, method,
        percentile)
  return traverse_util.unflatten_dict(steps)


def describe(model: RepVGG, *, image_size: int, mean: Any, std: Any,
             **extra: Any) -> dict[str, Any]:
  """The ``model`` metadata of a packed file: enough to rebuild ``model``'s
  deploy form and feed it uint8 images (``extra``: e.g. the dataset name)."""
  v = model.variant
  return {"blocks": list(v.blocks), "widths": [float(w) for w in v.widths],
          "groups": v.groups, "se": v.se, "num_classes": model.num_classes,
          "cifar_stem": model.cifar_stem, "act_bits": model.act_bits,
          "image_size": int(image_size), "mean": [float(m) for m in mean],
          "std": [float(s) for s in std], **extra}


def _model_from(desc: Mapping[str, Any], path: str) -> RepVGG:
  need = ("blocks", "widths", "groups", "se", "num_classes", "cifar_stem", "act_bits",
          "image_size", "mean", "std")
  missing = [k for k in need if k not in desc]
  if missing:
    raise ValueError(f"load_packed: {path} does not describe its model (missing {missing}); "
                     "export it again with repvgg_jax.deploy.describe(...)")
  variant = Variant(tuple(desc["blocks"]), tuple(desc["widths"]), desc["groups"], desc["se"])
  # XLA's conv: the program is the same on every backend (and exportable).
  return RepVGG(variant, num_classes=desc["num_classes"], deploy=True,
                cifar_stem=desc["cifar_stem"], act_bits=desc["act_bits"], conv_impl="xla")


def _decoded_variables(packed: PackedModel) -> dict[str, Any]:
  """Variables decoded with jnp ops from the packed arrays (inside a trace, the
  packed bytes stay constants and the decode runs in the program)."""
  flat = {tuple(p.split("/")): jnp.asarray(v) for p, v in packed.floats.items()}
  for p, l in packed.layers.items():
    idx = unpack_bits(l["packed"], l["bits"], int(np.prod(l["shape"])), xp=jnp)
    flat[("params",) + tuple(p.split("/"))] = decode(idx.reshape(l["shape"]),
                                                     jnp.asarray(l["codebook"]))
  return traverse_util.unflatten_dict(flat)


def forward_fn(packed: PackedModel):
  """``f(images uint8 NHWC) -> logits float32``: decode, normalize, deploy forward."""
  desc = packed.model
  model = _model_from(desc, "packed model")

  def forward(images):
    x = normalize_images(images, desc["mean"], desc["std"])
    return model.apply(_decoded_variables(packed), x)
  return forward


def _int8_weights(packed: PackedModel, path: str) -> tuple[np.ndarray, np.ndarray]:
  """(int8 kernel, float32 per-channel scale) of a layer whose levels are ``scale x int8``."""
  l = packed.layers.get(path)
  if l is None or "int_scale" not in l:
    raise ValueError(f"integer inference: layer {path} has no int8 grid (quantize it with "
                     "quant.int8_levels=True, or a uniform or lsq quantizer, at <= 8 bits)")
  w = np.asarray(decode(packed.indices(path), l["codebook"]), np.float64)
  scale = np.broadcast_to(np.asarray(l["int_scale"], np.float64), w.shape[-1:])
  k = np.rint(w / scale)
  if np.abs(k).max() > 128 or np.abs(k * scale - w).max() > 1e-5 * np.abs(w).max():
    raise ValueError(f"integer inference: the levels of {path} are not scale x int8")
  return k.astype(np.int8), scale.astype(np.float32)


def integer_forward_fn(packed: PackedModel):
  """``f(images uint8 NHWC) -> logits``: every conv and the head as int8 x int8
  -> int32 (``lax.conv_general_dilated`` / ``lax.dot_general`` with
  ``preferred_element_type=int32``), requantized in float32:
  ``acc * (act_step * weight_scale[o]) + bias``, then ReLU. Unsigned 8-bit
  activations are shifted by 128 into int8 and the shift is added back as
  ``128 * sum(w)`` per output channel (padding uses the shifted zero)."""
  desc = packed.model
  model = _model_from(desc, "packed model")
  bits = desc["act_bits"]
  if not bits:
    raise ValueError("integer inference needs quantized activations (act_bits=0 in this model)")
  if desc["se"]:
    raise ValueError("integer inference: SE layers (D2se) are not supported")
  variables = packed.to_variables()
  p, quant = variables["params"], variables["quant"]
  layers = []
  for b in model.blocks():
    k, scale = _int8_weights(packed, f"{b.name}/reparam_conv/kernel")
    layers.append((b, k, scale, p[b.name]["reparam_conv"]["bias"],
                   float(uniform.learned_step(quant[b.name]["act"]["step"]))))
  head_k, head_scale = _int8_weights(packed, "head/kernel")
  head_step = float(uniform.learned_step(quant["head_act"]["step"]))

  def to_int8(x, step, signed):
    qmin, qmax = uniform.int_range(bits, signed)
    zp = 128 if qmax > 127 else 0
    return (uniform.int_values(x, step, qmin, qmax) - zp).astype(jnp.int8), zp

  def forward(images):
    x = normalize_images(images, desc["mean"], desc["std"])
    for b, k, scale, bias, step in layers:
      xi, zp = to_int8(x, step, b.name == SIGNED_INPUT_LAYER)
      xi = jnp.pad(xi, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-zp)
      acc = jax.lax.conv_general_dilated(
          xi, jnp.asarray(k), (b.strides, b.strides), "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=b.groups,
          preferred_element_type=jnp.int32)
      if zp:
        acc = acc + zp * jnp.asarray(k.astype(np.int32).sum(axis=(0, 1, 2)))
      x = jax.nn.relu(acc.astype(jnp.float32) * (step * scale) + bias)
    pooled = jnp.mean(x, axis=(1, 2))
    xi, zp = to_int8(pooled, head_step, False)
    acc = jax.lax.dot_general(xi, jnp.asarray(head_k), (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    if zp:
      acc = acc + zp * jnp.asarray(head_k.astype(np.int32).sum(axis=0))
    return acc.astype(jnp.float32) * (head_step * head_scale) + p["head"]["bias"]
  return forward


@dataclasses.dataclass
class DeployedModel:
  """A packed model ready to run: ``model(images)`` on uint8 NHWC images of
  ``image_size`` (1 or 3 channels) returns float32 logits ``(N, num_classes)``."""
  packed: PackedModel

  def __post_init__(self):
    self._forward = jax.jit(forward_fn(self.packed))  # validates the model description
    self._integer = None

  @property
  def model(self) -> dict[str, Any]:
    return self.packed.model

  def _check(self, images) -> jax.Array:
    images = jnp.asarray(images)
    size = self.packed.model["image_size"]
    if (images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[1:3] != (size, size)
        or images.shape[3] not in (1, 3)):
      raise ValueError(f"expected uint8 images of shape (N, {size}, {size}, 1 or 3), got "
                       f"{images.dtype} {tuple(images.shape)}")
    return images

  def __call__(self, images) -> jax.Array:
    """Logits of the fake-quant deploy forward (float arithmetic on the quantized values)."""
    return self._forward(self._check(images))

  def integer(self, images) -> jax.Array:
    """Logits of the integer forward (:func:`integer_forward_fn`)."""
    if self._integer is None:
      self._integer = jax.jit(integer_forward_fn(self.packed))
    return self._integer(self._check(images))

  def to_variables(self) -> dict[str, Any]:
    return self.packed.to_variables()

  def size_bytes(self) -> int:
    return self.packed.size_bytes()

  def save(self, path) -> None:
    self.packed.save(path)


def load_packed(path) -> DeployedModel:
  """Reads a packed file (validated: format, version, sizes) into a callable model."""
  packed = read_packed(path)
  _model_from(packed.model, os.fspath(path))
  return DeployedModel(packed)


def export_stablehlo(packed: PackedModel, path=None) -> bytes:
  """The quantized deploy forward (uint8 images -> logits, any batch size)
  serialized by ``jax.export``; written atomically to ``path`` when given."""
  size = packed.model["image_size"]
  batch, = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  data = jax.export.export(jax.jit(forward_fn(packed)))(spec).serialize()

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(data)
  if path is not None:
    atomic_write(path, write)
  return data

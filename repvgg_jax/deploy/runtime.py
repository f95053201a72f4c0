"""The packed model's network: its description (:func:`model_description`), the deploy model
rebuilt from it, and the float forward on uint8 images (:func:`apply_fn` on decoded
variables, :func:`forward_fn` with the decode inside), which every runtime of the packed
file reproduces."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from repvgg_jax.data.transforms import normalize
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.quant.packed import PackedModel


def normalize_images(images: jax.Array, mean: Any, std: Any) -> jax.Array:
  """uint8 NHWC (C = 1 or 3) -> float32 NHWC with 3 channels: the input
  pipeline's normalization (:func:`repvgg_jax.data.transforms.normalize`)."""
  images = jnp.asarray(images)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return normalize(images, mean, std)


def model_description(model: RepVGG, *, image_size: int, mean: Any, std: Any,
                      **extra: Any) -> dict[str, Any]:
  """The ``model`` metadata of a packed file: enough to rebuild ``model``'s
  deploy form and feed it uint8 images (``extra``: e.g. the dataset name)."""
  v = model.variant
  return {"blocks": list(v.blocks), "widths": [float(w) for w in v.widths],
          "groups": v.groups, "se": v.se, "num_classes": model.num_classes,
          "cifar_stem": model.cifar_stem, "act_bits": model.act_bits,
          "image_size": int(image_size), "mean": [float(m) for m in mean],
          "std": [float(s) for s in std], **extra}


def model_from(desc: Mapping[str, Any], path: str) -> RepVGG:
  need = ("blocks", "widths", "groups", "se", "num_classes", "cifar_stem", "act_bits",
          "image_size", "mean", "std")
  missing = [k for k in need if k not in desc]
  if missing:
    raise ValueError(f"load_packed: {path} does not describe its model (missing {missing}); "
                     "export it again with repvgg_jax.deploy.model_description(...)")
  variant = Variant(tuple(desc["blocks"]), tuple(desc["widths"]), desc["groups"], desc["se"])
  # XLA's conv: the program is the same on every backend (and exportable).
  return RepVGG(variant, num_classes=desc["num_classes"], deploy=True,
                cifar_stem=desc["cifar_stem"], act_bits=desc["act_bits"], conv_impl="xla")


def apply_fn(desc: Mapping[str, Any]):
  """``f(variables, images uint8 NHWC) -> logits float32`` of the deploy network that
  ``desc`` (a packed file's ``model``) describes: normalize, deploy forward."""
  model = model_from(desc, "packed model")

  def apply(variables, images):
    return model.apply(variables, normalize_images(images, desc["mean"], desc["std"]))
  return apply


def forward_fn(packed: PackedModel):
  """``f(images uint8 NHWC) -> logits float32``: decode, normalize, deploy forward. Traced,
  the packed bytes stay constants of the program and are decoded inside it (on every
  call, unless the compiler folds the decode: :class:`DeployedModel` decodes once)."""
  apply = apply_fn(packed.model)
  return lambda images: apply(packed.to_variables(xp=jnp), images)

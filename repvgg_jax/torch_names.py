"""The PyTorch names of our variables, official RepVGG's and timm's, and the array
layouts between theirs and ours (:mod:`repvgg_jax.convert` maps whole state dicts).

Names, ours | official (DingXiaoH/RepVGG) | timm (``byobnet``)::

  stem                       | stage0                   | stem
  stages_{i}_{j}             | stage{i+1}.{j}           | stages.{i}.{j}
  conv_kxk/conv/kernel       | rbr_dense.conv.weight    | conv_kxk.conv.weight
  conv_kxk/bn/{scale,bias}   | rbr_dense.bn.{weight,bias}
  conv_1x1/...               | rbr_1x1...               | conv_1x1...
  identity/{scale,bias}      | rbr_identity.{weight,bias} | identity.{weight,bias}
  se/{down,up}/{kernel,bias} | se.{down,up}.{weight,bias} | attn.{fc1,fc2}.{weight,bias}
  reparam_conv/{kernel,bias} | rbr_reparam.{weight,bias} | reparam_conv.{weight,bias}
  head/{kernel,bias}         | linear.{weight,bias}     | head.fc.{weight,bias}
  batch_stats .../{mean,var} | ...running_mean, ...running_var (BN modules)

Layouts: conv weights OIHW -> HWIO (``transpose(2, 3, 1, 0)``); a grouped
PyTorch weight ``(O, I/groups, kh, kw)`` becomes Flax's
``(kh, kw, I/groups, O)`` with ``feature_group_count=groups``; linear
``(out, in)`` -> Dense ``(in, out)``; SE 1x1 convs ``(out, in, 1, 1)`` ->
Dense ``(in, out)``.
"""

from __future__ import annotations

import re

import numpy as np

NAMINGS = ("official", "timm")
_BN_LEAVES = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))


def _block_table(style: str) -> dict[str, tuple[str, tuple[str, ...], str]]:
  """Torch key suffix inside one block -> (collection, our sub-path, layout)."""
  official = style == "official"
  roles = {"conv_kxk": "rbr_dense" if official else "conv_kxk",
           "conv_1x1": "rbr_1x1" if official else "conv_1x1"}
  table = {}
  for ours, theirs in roles.items():
    table[f"{theirs}.conv.weight"] = ("params", (ours, "conv", "kernel"), "conv")
    for leaf, coll, our_leaf in _BN_LEAVES:
      table[f"{theirs}.bn.{leaf}"] = (coll, (ours, "bn", our_leaf), "vector")
  for leaf, coll, our_leaf in _BN_LEAVES:
    table[f"{'rbr_identity' if official else 'identity'}.{leaf}"] = (
        coll, ("identity", our_leaf), "vector")
  se = {"down": "se.down" if official else "attn.fc1", "up": "se.up" if official else "attn.fc2"}
  for ours, theirs in se.items():
    table[f"{theirs}.weight"] = ("params", ("se", ours, "kernel"), "se")
    table[f"{theirs}.bias"] = ("params", ("se", ours, "bias"), "vector")
  reparam = "rbr_reparam" if official else "reparam_conv"
  table[f"{reparam}.weight"] = ("params", ("reparam_conv", "kernel"), "conv")
  table[f"{reparam}.bias"] = ("params", ("reparam_conv", "bias"), "vector")
  return table


_BLOCKS = {s: _block_table(s) for s in NAMINGS}
_BLOCKS_INV = {s: {(c, p): (k, lay) for k, (c, p, lay) in t.items()} for s, t in _BLOCKS.items()}
_HEAD = {"official": "linear", "timm": "head.fc"}
_BLOCK_RE = {"official": re.compile(r"^(stage0|stage([1-9]\d*)\.(\d+))\.(.+)$"),
             "timm": re.compile(r"^(stem|stages\.(\d+)\.(\d+))\.(.+)$")}


def torch_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Our array shape -> the PyTorch tensor's shape for the same variable."""
  if layout == "conv":
    h, w, i, o = shape
    return (o, i, h, w)
  if layout == "linear":
    return tuple(reversed(shape))
  if layout == "se":
    return (shape[1], shape[0], 1, 1)
  return tuple(shape)


def from_torch_layout(layout: str, a: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return a.transpose(2, 3, 1, 0)
  if layout == "linear":
    return a.T
  if layout == "se":
    return a[:, :, 0, 0].T
  return a


def to_torch_layout(layout: str, a: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return a.transpose(3, 2, 0, 1)
  if layout == "linear":
    return a.T
  if layout == "se":
    return a.T[:, :, None, None]
  return a


def parse_key(key: str, style: str) -> tuple[str, tuple[str, ...], str] | None:
  """A torch key -> (collection, our path, layout), or None if it is not ours."""
  head = _HEAD[style]
  if key in (f"{head}.weight", f"{head}.bias"):
    leaf = key.rsplit(".", 1)[1]
    return ("params", ("head", "kernel" if leaf == "weight" else "bias"),
            "linear" if leaf == "weight" else "vector")
  m = _BLOCK_RE[style].match(key)
  if m is None or m.group(4) not in _BLOCKS[style]:
    return None
  if m.group(2) is None:
    block = "stem"
  else:
    stage = int(m.group(2)) - (1 if style == "official" else 0)
    block = f"stages_{stage}_{int(m.group(3))}"
  coll, sub, layout = _BLOCKS[style][m.group(4)]
  return coll, (block,) + sub, layout


def torch_key(coll: str, path: tuple[str, ...], style: str) -> tuple[str, str] | None:
  """(collection, our path) -> (torch key, layout), or None if it has no torch name."""
  if path in (("head", "kernel"), ("head", "bias")):
    return (f"{_HEAD[style]}.{'weight' if path[1] == 'kernel' else 'bias'}",
            "linear" if path[1] == "kernel" else "vector")
  found = _BLOCKS_INV[style].get((coll, path[1:]))
  if found is None:
    return None
  if path[0] == "stem":
    prefix = "stage0" if style == "official" else "stem"
  else:
    m = re.fullmatch(r"stages_(\d+)_(\d+)", path[0])
    if m is None:
      return None
    i, j = int(m.group(1)), int(m.group(2))
    prefix = f"stage{i + 1}.{j}" if style == "official" else f"stages.{i}.{j}"
  return f"{prefix}.{found[0]}", found[1]


def detect_naming(keys: list[str]) -> str:
  votes = {s: sum(parse_key(k, s) is not None for k in keys) for s in NAMINGS}
  if votes["official"] and votes["timm"]:
    raise ValueError("state dict mixes official RepVGG names (stage0, rbr_dense, linear) "
                     "and timm names (stem, stages, conv_kxk, head.fc)")
  return "official" if votes["official"] else "timm"

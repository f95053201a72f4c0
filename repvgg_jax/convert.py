"""PyTorch RepVGG checkpoints (official and timm) <-> Flax variables.

Names and layouts: :mod:`repvgg_jax.torch_names`.

BatchNorm: ``running_var`` maps unchanged. PyTorch stores the unbiased
estimate (batch variance times n/(n-1)) while Flax's BatchNorm averages the
biased batch variance, but both divide by ``sqrt(var + eps)`` in eval and in
the merge, so imported weights reproduce PyTorch's eval output exactly; only
fine-tuning here updates the statistic the Flax way (the difference is the
factor n/(n-1) for n = batch * H * W values per channel). Momentum 0.1 in
PyTorch is Flax's 0.9, eps 1e-5 in both. ``num_batches_tracked`` is dropped
on import and written as 0 on export.

``import repvgg_jax.convert`` needs neither torch nor safetensors: state
dicts may hold torch tensors or numpy arrays, and torch is imported only to
read ``.pth`` files or to return tensors.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repvgg_jax import torch_names
from repvgg_jax.models.repvgg import VARIANTS, create_model

@functools.lru_cache(maxsize=32)
def _expected(name: str, num_classes: int, deploy: bool) -> dict[tuple[str, ...], tuple]:
  """Flat {(collection, *path): shape} of the model's variables (no arrays)."""
  model = create_model(name, num_classes=num_classes, deploy=deploy)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 32, 32, 3)), train=False))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _plausible(variant, found: dict[tuple[str, ...], tuple], depths_only: bool = False) -> bool:
  """Cheap filter on depths, SE and block widths before building shape tables.

  ``found`` maps ``(collection, block, ...)`` to the PyTorch tensor shape.
  """
  depths = [0, 0, 0, 0]
  for _, block, *rest in found:
    m = re.fullmatch(r"stages_(\d)_(\d+)", block)
    if m and int(m.group(1)) < 4:
      depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
  if tuple(depths) != variant.blocks or depths_only:
    return tuple(depths) == variant.blocks
  if any(p[2] == "se" for p in found if len(p) > 2) != variant.se:
    return False
  for (coll, block, *rest), shape in found.items():
    if rest[-2:] in (["conv", "kernel"], ["reparam_conv", "kernel"]) and len(shape) == 4:
      m = re.fullmatch(r"stages_(\d)_\d+", block)
      width = (min(64, int(64 * variant.widths[0])) if block == "stem" else
               int(64 * 2 ** int(m.group(1)) * variant.widths[int(m.group(1))]) if m else None)
      if width is not None and shape[0] != width:  # OIHW: output channels first
        return False
  return True


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen first
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  return np.asarray(value, np.float32)


def _problems(expected: dict, given: dict, unknown: list[str], style: str) -> list[str]:
  """Readable lines for unknown, missing and mis-shaped keys (empty if none)."""
  missing, bad_shape = [], []
  for path, shape in expected.items():
    key, layout = torch_names.torch_key(path[0], path[1:], style)
    want = torch_names.torch_shape(layout, shape)
    if path not in given:
      missing.append(f"{key} {want}")
    elif given[path][1] != want:
      bad_shape.append(f"{key}: got {given[path][1]}, expected {want}")
  unexpected = sorted(unknown) + sorted(given[p][0] for p in given if p not in expected)
  lines = []
  for title, items in (("unexpected keys", unexpected), ("missing keys", missing),
                       ("wrong shapes", bad_shape)):
    if items:
      lines.append(f"  {len(items)} {title}:")
      lines.extend(f"    {item}" for item in items)
  return lines


def _strip_prefix(key: str) -> str:
  return key[len("module."):] if key.startswith("module.") else key


def from_torch_state_dict(state_dict: Mapping[str, Any], name: str | None = None, *,
                          num_classes: int | None = None) -> tuple[str, dict[str, Any]]:
  """Converts a PyTorch RepVGG state dict (official or timm names) to Flax variables.

  Args:
    state_dict: key -> torch tensor or numpy array. Official train-time keys
      (``stage0.rbr_dense.conv.weight``, ...), official deploy keys
      (``rbr_reparam``), timm keys (``stem.conv_kxk.conv.weight``,
      ``stages.{i}.{j}...``, ``head.fc.*``) or timm deploy keys
      (``reparam_conv``); an optional ``module.`` prefix is removed.
    name: the variant (``"RepVGG-A0"``, ``"repvgg_b1g4"``, ...); inferred from
      the shapes when None.
    num_classes: head width; read from the head weight when None.
  Returns:
    ``(name, variables)``: the :func:`repvgg_jax.create_model` name and
    ``{"params", "batch_stats"}`` (train form) or ``{"params"}`` (deploy
    form, for ``create_model(name, deploy=True)``), float32 ``jax.Array``s in
    NHWC/HWIO layouts. Use the model with ``norm="bn"`` (the default).
  Raises:
    ValueError: listing every unknown, missing and mis-shaped key at once;
      nothing is returned half-filled.
  """
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"expected a state dict (a mapping of key -> tensor), got "
                     f"{type(state_dict).__name__}")
  raw = {}
  for k, v in state_dict.items():
    if not isinstance(k, str):
      raise ValueError(f"state dict key {k!r} is not a string")
    if k.endswith("num_batches_tracked"):  # a PyTorch BN counter, no Flax variable
      continue
    if _strip_prefix(k) in raw:
      raise ValueError(f"state dict has both {k!r} and {_strip_prefix(k)!r}")
    raw[_strip_prefix(k)] = v
  keys = list(raw)
  style = torch_names.detect_naming(keys)
  given, unknown = {}, []
  for key in keys:
    parsed = torch_names.parse_key(key, style)
    if parsed is None:
      unknown.append(key)
    else:
      shape = tuple(raw[key].shape) if hasattr(raw[key], "shape") else np.shape(raw[key])
      given[(parsed[0],) + parsed[1]] = (key, shape, parsed[2])
  if not given:
    raise ValueError(f"none of the {len(unknown)} keys is a RepVGG key (official or timm "
                     "names); unexpected keys:\n" + "\n".join(f"  {k}" for k in unknown))
  deploy = any("reparam_conv" in p for p in given)
  if num_classes is None:
    head = given.get(("params", "head", "kernel"))
    num_classes = head[1][0] if head and len(head[1]) == 2 else 1000
  found = {p: g[1] for p, g in given.items()}
  if name is not None:
    model = create_model(name, num_classes=num_classes)  # validates the name
    candidates = [n for n, v in VARIANTS.items() if v == model.variant]
  else:
    # When nothing fits, the closest variant (same depths first) is reported.
    candidates = ([n for n, v in VARIANTS.items() if _plausible(v, found)] or
                  [n for n, v in VARIANTS.items() if _plausible(v, found, depths_only=True)] or
                  list(VARIANTS))
  reports = []
  for cand in candidates:
    report = _problems(_expected(cand, num_classes, deploy), given, unknown, style)
    if not report:
      return cand, _build(given, raw, deploy)
    reports.append((len(report), cand, report))
  _, cand, report = min(reports)
  form = "deploy" if deploy else "train"
  hint = ""
  if deploy and any(p[2] in ("conv_kxk", "conv_1x1", "identity") for p in given):
    hint = ("\n  (some blocks are merged and some are not: reparameterize the whole model "
            "first)")
  how = "given" if name is not None else "closest match"
  raise ValueError(f"state dict ({style} names, {form} form) does not match {cand} "
                   f"({how}, num_classes={num_classes}):\n" + "\n".join(report) + hint)


def _build(given: dict, raw: dict, deploy: bool) -> dict[str, Any]:
  flat = {path: jnp.asarray(torch_names.from_torch_layout(layout, _to_numpy(raw[key])))
          for path, (key, _, layout) in given.items()}
  variables = traverse_util.unflatten_dict(flat)
  if not deploy:
    variables.setdefault("batch_stats", {})
  return variables


def to_torch_state_dict(variables: Mapping[str, Any], style: str = "timm", *,
                        as_torch: bool = False) -> dict[str, Any]:
  """Converts our variables (train or deploy form) to a PyTorch state dict.

  Args:
    variables: ``{"params", "batch_stats"}`` of a train-form model with
      ``norm="bn"``, or ``{"params"}`` of a deploy-form model (e.g. from
      :func:`repvgg_jax.merge`).
    style: ``"timm"`` (loads into ``timm.create_model("repvgg_...")``, after
      ``timm.utils.reparameterize_model`` for deploy weights) or
      ``"official"`` (the official ``RepVGG`` module, ``deploy=True`` for
      deploy weights).
    as_torch: return ``torch.Tensor`` values (needs torch) instead of numpy.
  Returns:
    Key -> array in PyTorch layouts (OIHW); every BN gets a
    ``num_batches_tracked`` of 0 so strict ``load_state_dict`` accepts it.
  Raises:
    ValueError: listing every variable with no PyTorch counterpart (e.g. OABN
      bound settings: merge an OABN model first, its deploy weights are exact).
  """
  if style not in torch_names.NAMINGS:
    raise ValueError(f"style={style!r}: expected one of {torch_names.NAMINGS}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("expected a variables dict with a 'params' collection")
  flat = traverse_util.flatten_dict({k: v for k, v in variables.items()})
  out, bad = {}, []
  for path, value in flat.items():
    found = torch_names.torch_key(path[0], path[1:], style) if len(path) > 2 else None
    if found is None:
      bad.append("/".join(path))
      continue
    key, layout = found
    # A C-ordered, writable copy: torch and safetensors expect contiguous buffers.
    out[key] = np.array(torch_names.to_torch_layout(layout, np.asarray(value)), order="C")
    if key.endswith("running_mean"):
      out[key[:-len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  if bad:
    raise ValueError(f"{len(bad)} variable(s) have no PyTorch RepVGG counterpart:\n" +
                     "\n".join(f"  {b}" for b in sorted(bad)))
  out = dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))
  if as_torch:
    import torch  # optional dependency: only for tensors out
    out = {k: torch.from_numpy(v) for k, v in out.items()}
  return out


def _natural(key: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  """Finds the state dict inside a training checkpoint's wrapper dict."""
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return obj


def load_torch_checkpoint(path: str | os.PathLike, name: str | None = None, *,
                          num_classes: int | None = None) -> tuple[str, dict[str, Any]]:
  """Reads a PyTorch RepVGG checkpoint file and converts it to Flax variables.

  Args:
    path: ``.safetensors`` (read with ``safetensors.numpy``; no torch needed)
      or ``.pth``/``.pt``/other (``torch.load(..., weights_only=True)`` on the
      CPU). A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a
      ``module.`` key prefix are accepted.
    name, num_classes: as in :func:`from_torch_state_dict`.
  Returns:
    ``(name, variables)`` as :func:`from_torch_state_dict`.
  Raises:
    ValueError: the file cannot be read (truncated, not a checkpoint) or its
      keys do not match a RepVGG variant.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint {path!r} does not exist or is not a file")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError("reading .safetensors needs the safetensors package "
                        "(pip install 'repvgg-jax[torch]')") from e
    try:
      state_dict = load_file(path)
    except Exception as e:  # safetensors raises its own error types
      raise ValueError(f"cannot read {path!r}: {e} (is the file truncated or not a "
                       "safetensors file?)") from e
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs torch (pip install 'repvgg-jax[torch]'), "
                        "or convert it to .safetensors") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip and pickle readers raise many types
      raise ValueError(f"cannot read {path!r}: {e} (is the file truncated or not a "
                       "PyTorch checkpoint?)") from e
    state_dict = _unwrap(obj, path)
  return from_torch_state_dict(state_dict, name, num_classes=num_classes)

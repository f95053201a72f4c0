"""Structural re-parameterization: pure functions over variable pytrees.

``merge(variables)`` turns the train-form (multi-branch) RepVGG variables
into deploy-form variables (one 3x3 conv with bias per block). It needs no
module: blocks are found by their ``conv_kxk`` key, group counts are read off
kernel shapes, and an OABN's bound lives in its ``batch_stats``.

Math (HWIO kernels, per output channel ``o``)::

  s = bound(gamma / sqrt(var + eps));   K' = K * s;   b' = beta - mean * s
  K = K3' + pad1x1(K1') + I * s_id;     b = b3' + b1' + b_id'
  I[1, 1, o % (Cin/groups), o] = 1       (group-aware identity kernel)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from repvgg_jax.nn.oabn import BOUND_KEYS, scale_shift

# Same as PyTorch's BatchNorm2d default; the models are built with it.
BN_EPSILON = 1e-5
BLOCK_KEYS = frozenset({"conv_kxk", "conv_1x1", "identity", "se"})
_STATS_KEYS = frozenset({"mean", "var", *BOUND_KEYS})


def _path(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _get(tree: Mapping[str, Any], key: str, path: tuple[str, ...]) -> Any:
  if not isinstance(tree, Mapping) or key not in tree:
    raise ValueError(f"merge: missing variable {_path(path + (key,))}")
  return tree[key]


def _check_bn(params: Mapping[str, Any], stats: Mapping[str, Any], channels: int,
              pp: tuple[str, ...], sp: tuple[str, ...]) -> None:
  for tree, keys, path in ((params, {"scale", "bias"}, pp), (stats, {"mean", "var"}, sp)):
    for k in sorted(keys):
      v = _get(tree, k, path)
      if jnp.shape(v) != (channels,):
        raise ValueError(f"merge: {_path(path + (k,))} has shape {jnp.shape(v)}, "
                         f"expected ({channels},)")
  odd = sorted(set(params) - {"scale", "bias"}) + sorted(set(stats) - _STATS_KEYS)
  if odd:
    raise ValueError(f"merge: unexpected variable(s) {odd} under {_path(pp)}")


def identity_kernel(channels: int, groups: int, dtype: Any = jnp.float32) -> jax.Array:
  """HWIO 3x3 kernel of the identity map for a grouped conv with Cin == Cout."""
  if channels % groups:
    raise ValueError(f"identity_kernel: channels={channels} not divisible by groups={groups}")
  per_group = channels // groups
  o = jnp.arange(channels)
  k = jnp.zeros((3, 3, per_group, channels), dtype)
  return k.at[1, 1, o % per_group, o].set(1)


def fold_bn(kernel: jax.Array, bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any],
            epsilon: float = BN_EPSILON) -> tuple[jax.Array, jax.Array]:
  """Folds a BN/OABN (eval mode) into the preceding bias-free conv.

  Args:
    kernel: HWIO kernel ``(kh, kw, Cin/groups, Cout)``.
    bn_params: ``{"scale", "bias"}``, each ``(Cout,)``.
    bn_stats: ``{"mean", "var"}`` (+ OABN's bound settings), each ``(Cout,)``.
  Returns:
    ``(kernel * s, beta - mean * s)`` with ``s`` the (bounded) BN scale.
  """
  s, shift = scale_shift(bn_params, bn_stats, epsilon)
  return kernel * s, shift


def merge_block(params: Mapping[str, Any], stats: Mapping[str, Any],
                path: tuple[str, ...] = ("params",)) -> tuple[jax.Array, jax.Array]:
  """Merges one train-form block's branches into one 3x3 ``(kernel, bias)``.

  Args:
    params: the block's params (``conv_kxk``, ``conv_1x1``, optional
      ``identity``; ``se`` is ignored here).
    stats: the block's ``batch_stats``.
    path: where the block sits, for error messages.
  """
  odd = sorted(set(params) - BLOCK_KEYS)
  if odd:
    raise ValueError(f"merge: unexpected variable(s) {odd} in block {_path(path)}")
  sp = ("batch_stats",) + path[1:]
  kernel = bias = None
  for name, size in (("conv_kxk", 3), ("conv_1x1", 1)):
    bp, bs = _get(params, name, path), _get(stats, name, sp)
    k = _get(_get(bp, "conv", path + (name,)), "kernel", path + (name, "conv"))
    if kernel is not None and jnp.shape(k) != (1, 1) + kernel.shape[2:]:
      raise ValueError(f"merge: {_path(path + (name, 'conv', 'kernel'))} has shape "
                       f"{jnp.shape(k)}, expected {(1, 1) + kernel.shape[2:]}")
    if jnp.ndim(k) != 4 or jnp.shape(k)[:2] != (size, size):
      raise ValueError(f"merge: {_path(path + (name, 'conv', 'kernel'))} has shape "
                       f"{jnp.shape(k)}, expected ({size}, {size}, Cin/groups, Cout)")
    _check_bn(_get(bp, "bn", path + (name,)), _get(bs, "bn", sp + (name,)), k.shape[-1],
              path + (name, "bn"), sp + (name, "bn"))
    k, b = fold_bn(k, bp["bn"], bs["bn"])
    if kernel is None:
      kernel, bias = k, b
    else:
      kernel = kernel + jnp.pad(k, ((1, 1), (1, 1), (0, 0), (0, 0)))
      bias = bias + b
  if "identity" in params:
    cin_g, cout = kernel.shape[2:]
    if cout % cin_g:
      raise ValueError(f"merge: identity branch in {_path(path)} but kernel shape "
                       f"{kernel.shape} cannot have Cin == Cout")
    id_stats = _get(stats, "identity", sp)
    _check_bn(params["identity"], id_stats, cout, path + ("identity",), sp + ("identity",))
    k, b = fold_bn(identity_kernel(cout, cout // cin_g, kernel.dtype),
                   params["identity"], id_stats)
    kernel, bias = kernel + k, bias + b
  odd = sorted(set(stats) - set(params))
  if odd:
    raise ValueError(f"merge: batch_stats {odd} in block {_path(sp)} have no params")
  return kernel, bias


def _merge_tree(params: Mapping[str, Any], stats: Mapping[str, Any],
                path: tuple[str, ...]) -> dict[str, Any]:
  out = {}
  for name, sub in params.items():
    p = path + (name,)
    sub_stats = stats.get(name, {}) if isinstance(stats, Mapping) else {}
    if isinstance(sub, Mapping) and "conv_kxk" in sub:
      kernel, bias = merge_block(sub, sub_stats, p)
      out[name] = {"reparam_conv": {"kernel": kernel, "bias": bias}}
      if "se" in sub:
        out[name]["se"] = dict(sub["se"])
    elif isinstance(sub, Mapping):
      out[name] = _merge_tree(sub, sub_stats, p)
    else:
      out[name] = sub
  odd = sorted(set(stats) - set(params)) if isinstance(stats, Mapping) else []
  if odd:
    sp = "/".join(("batch_stats",) + path[1:])
    raise ValueError(f"merge: batch_stats {odd} under {sp or 'batch_stats'} have no params")
  return out


def merge(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Train-form variables -> deploy-form variables (pure, jit-able).

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a train-form
      RepVGG (BN or OABN).
  Returns:
    ``{"params": ...}`` for ``create_model(name, deploy=True)`` with the same
    name and options. Deploy-form input passes through unchanged.
  Raises:
    ValueError: naming the missing, mis-shaped or unexpected variable.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("merge: expected a variables dict with a 'params' collection, got "
                     f"{type(variables).__name__} with keys "
                     f"{sorted(variables) if isinstance(variables, Mapping) else None}")
  odd = sorted(set(variables) - {"params", "batch_stats"})
  if odd:
    raise ValueError(f"merge: unexpected collection(s) {odd}; expected params, batch_stats")
  return {"params": _merge_tree(variables["params"], variables.get("batch_stats", {}),
                                ("params",))}

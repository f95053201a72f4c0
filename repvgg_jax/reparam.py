"""Structural re-parameterization: pure functions over variable pytrees.

``merge(variables)`` turns the train-form (multi-branch) RepVGG variables
into deploy-form variables (one 3x3 conv with bias per block). It needs no
module: blocks are found by their ``conv_kxk`` key, group counts are read off
kernel shapes, and an OABN's bound settings live in the ``settings`` collection.

Math (HWIO kernels, per output channel ``o``)::

  s = bound(gamma / sqrt(var + eps));   K' = K * s;   b' = beta - mean * s
  K = K3' + pad1x1(K1') + I * s_id;     b = b3' + b1' + b_id'
  I[1, 1, o % (Cin/groups), o] = 1       (group-aware identity kernel)

``bound`` is OABN's (``median`` form, per BN) or, for a block with the
``branch`` form, :func:`repvgg_jax.models.oabn.branch_bound` on ``s1, s_id``. A
QARepVGG block (``post_bn`` present: 1x1 conv and identity without BN, one BN
after the sum) merges as ``K = (K3' + pad1x1(K1) + g * I) * s_post``,
``b = (b3' - mean_post) * s_post + beta_post`` with ``g`` its
``settings/identity_gain`` (1; absent when the block has no identity).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from repvgg_jax.models.oabn import BOUND_KEYS, BRANCH_KEYS, SETTINGS, branch_bound, scale_shift

# Same as PyTorch's BatchNorm2d default; the models are built with it.
BN_EPSILON = 1e-5
BLOCK_KEYS = frozenset({"conv_kxk", "conv_1x1", "identity", "post_bn", "se"})
_STATS_KEYS = frozenset({"mean", "var", *BOUND_KEYS})
# A QARepVGG block's identity branch: a constant gain, recorded in its settings.
IDENTITY_GAIN = "identity_gain"
# Block-level entries that are settings, not a sub-layer's statistics.
_BLOCK_RECORDS = frozenset({*BRANCH_KEYS, IDENTITY_GAIN})
# Every entry name of the settings collection.
SETTING_KEYS = frozenset({*BOUND_KEYS, *_BLOCK_RECORDS})
BRANCHES = ("3x3", "1x1", "identity")


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


def _kernel(params: Mapping[str, Any], path: tuple[str, ...], size: int,
            like: jax.Array | None = None) -> jax.Array:
  k = _get(params, "kernel", path)
  want = (size, size) + (like.shape[2:] if like is not None else ("Cin/groups", "Cout"))
  if jnp.ndim(k) != 4 or jnp.shape(k)[:2] != (size, size) or (
      like is not None and jnp.shape(k)[2:] != like.shape[2:]):
    raise ValueError(f"merge: {_path(path + ('kernel',))} has shape {jnp.shape(k)}, "
                     f"expected {want}".replace("'", ""))
  return k


def _bn(params: Mapping[str, Any], stats: Mapping[str, Any], name: str, channels: int,
        pp: tuple[str, ...], sp: tuple[str, ...]) -> tuple[Mapping, Mapping]:
  bp, bs = _get(params, name, pp), _get(stats, name, sp)
  _check_bn(bp, bs, channels, pp + (name,), sp + (name,))
  return bp, bs


def block_branches(params: Mapping[str, Any], stats: Mapping[str, Any],
                   path: tuple[str, ...] = ("params",)) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Each branch's folded contribution to one train-form block's merged conv.

  Args:
    params: the block's params (RepVGG: ``conv_kxk``, ``conv_1x1``, optional
      ``identity``; QARepVGG: ``conv_kxk``, ``conv_1x1`` (a bare conv),
      ``post_bn``; ``se`` is ignored here).
    stats: the block's ``batch_stats`` with its ``settings`` laid over them
      (:func:`norm_state`).
    path: where the block sits, for error messages.
  Returns:
    ``{"3x3": (kernel, bias), "1x1": ..., "identity": ...}`` (no ``identity``
    without that branch), 3x3 HWIO kernels whose sums are the merged
    ``(kernel, bias)``; a QARepVGG block's post-sum BN is folded into each.
  """
  odd = sorted(set(params) - BLOCK_KEYS)
  if odd:
    raise ValueError(f"merge: unexpected variable(s) {odd} in block {_path(path)}")
  sp = ("batch_stats",) + path[1:]
  qa = "post_bn" in params
  p3, s3p = _get(params, "conv_kxk", path), _get(stats, "conv_kxk", sp)
  k3 = _kernel(_get(p3, "conv", path + ("conv_kxk",)), path + ("conv_kxk", "conv"), 3)
  cin_g, cout = k3.shape[2:]
  bn3 = _bn(p3, s3p, "bn", cout, path + ("conv_kxk",), sp + ("conv_kxk",))
  s3, shift3 = scale_shift(*bn3, BN_EPSILON)
  p1 = _get(params, "conv_1x1", path)
  has_id = (IDENTITY_GAIN in stats) if qa else ("identity" in params)
  if has_id and cout % cin_g:
    raise ValueError(f"merge: identity branch in {_path(path)} but kernel shape "
                     f"{k3.shape} cannot have Cin == Cout")
  if qa:
    for where, tree in ((path + ("identity",), params), (path + ("conv_1x1", "bn"), p1)):
      if where[-1] in tree:
        raise ValueError(f"merge: QARepVGG block {_path(path)} (it has post_bn) has "
                         f"{_path(where)}; its 1x1 and identity branches have no BN")
    k1 = _kernel(p1, path + ("conv_1x1",), 1, k3)
    s1, shift1 = jnp.ones(cout), jnp.zeros(cout)
    s_id, shift_id = jnp.asarray(stats.get(IDENTITY_GAIN, 1.0)), 0.0
  else:
    k1 = _kernel(_get(p1, "conv", path + ("conv_1x1",)), path + ("conv_1x1", "conv"), 1, k3)
    bn1 = _bn(p1, _get(stats, "conv_1x1", sp), "bn", cout, path + ("conv_1x1",),
              sp + ("conv_1x1",))
    s1, shift1 = scale_shift(*bn1, BN_EPSILON)
    s_id = shift_id = None
    if has_id:
      bn_id = _bn(params, stats, "identity", cout, path, sp)
      s_id, shift_id = scale_shift(*bn_id, BN_EPSILON)
    if "bound_tau" in stats:  # the branch form (BRANCH_KEYS)
      s1, s_id = branch_bound(s3, k3, s1, k1, s_id, stats["bound_tau"], stats["bound_smooth"])
      s1, shift1 = scale_shift(*bn1, BN_EPSILON, s1)
      if has_id:
        s_id, shift_id = scale_shift(*bn_id, BN_EPSILON, s_id)
  odd = sorted(set(stats) - set(params) - _BLOCK_RECORDS)
  if odd:
    raise ValueError(f"merge: batch_stats {odd} in block {_path(sp)} have no params")
  parts = {"3x3": (k3 * s3, shift3),
           "1x1": (jnp.pad(k1 * s1, ((1, 1), (1, 1), (0, 0), (0, 0))), shift1 * jnp.ones(cout))}
  if has_id:
    parts["identity"] = (identity_kernel(cout, cout // cin_g) * s_id,
                         shift_id * jnp.ones(cout))
  if qa:
    post = _bn(params, stats, "post_bn", cout, path, sp)
    s_post, shift_post = scale_shift(*post, BN_EPSILON)
    parts = {b: (k * s_post, bias * s_post + (shift_post if b == "3x3" else 0.0))
             for b, (k, bias) in parts.items()}
  return parts


def merge_block(params: Mapping[str, Any], stats: Mapping[str, Any],
                path: tuple[str, ...] = ("params",)) -> tuple[jax.Array, jax.Array]:
  """Merges one train-form block's branches into one 3x3 ``(kernel, bias)``
  (the sums of :func:`block_branches`)."""
  parts = block_branches(params, stats, path).values()
  return sum(k for k, _ in parts), sum(b for _, b in parts)


def merged_kernels(variables: Mapping[str, Any]) -> dict[str, jax.Array]:
  """``{"stem": kernel, "stages_0_0": kernel, ...}``: every block's merged 3x3
  kernel (HWIO), named by its path; train-form variables are merged first
  (differentiably), deploy-form ones read as they are."""
  flat = traverse_util.flatten_dict(merge(variables)["params"])
  return {"/".join(k[:-2]): v for k, v in flat.items() if k[-2:] == ("reparam_conv", "kernel")}


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


def _overlay(stats: Any, settings: Any) -> Any:
  if not isinstance(settings, Mapping):
    return settings
  stats = stats if isinstance(stats, Mapping) else {}
  return {**stats, **{k: _overlay(stats.get(k), v) for k, v in settings.items()}}


def norm_state(variables: Mapping[str, Any]) -> dict[str, Any]:
  """What the merge reads besides ``params``: ``batch_stats`` (running means and
  variances) with the ``settings`` collection (OABN bounds, QARepVGG identity gains)
  laid over it, one tree."""
  return _overlay(dict(variables.get("batch_stats", {})), dict(variables.get(SETTINGS, {})))


def merge(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Train-form variables -> deploy-form variables (pure, jit-able).

  Args:
    variables: ``{"params": ..., "batch_stats": ..., "settings": ...}`` of a
      train-form RepVGG (BN or OABN; ``settings`` where the model records any).
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
  odd = sorted(set(variables) - {"params", "batch_stats", SETTINGS})
  if odd:
    raise ValueError(f"merge: unexpected collection(s) {odd}; expected params, batch_stats, "
                     f"{SETTINGS}")
  return _merge_jit({"params": variables["params"], "stats": norm_state(variables)})


@jax.jit
def _merge_jit(variables: dict[str, Any]) -> dict[str, Any]:
  # One compiled program per model, called eagerly or traced into the caller's jit: op by
  # op the merge of A0 is a few hundred tiny compilations in every new process. The
  # checks of _merge_tree read structure and shapes only, so they raise while tracing.
  return {"params": _merge_tree(variables["params"], variables["stats"], ("params",))}

"""Outlier statistics of merged (deploy) kernels, per tensor and per output channel;
their figures are in :mod:`repvgg_jax.plots`."""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import reparam
from repvgg_jax.models.oabn import bn_scale, bound
from repvgg_jax.reparam import BN_EPSILON, BRANCHES, block_branches, merge, norm_state


def merged_kernels(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """:func:`repvgg_jax.reparam.merged_kernels` as float64 numpy arrays."""
  return {k: np.asarray(w, np.float64) for k, w in reparam.merged_kernels(variables).items()}


@jax.jit
def kurtosis(w: jax.Array) -> jax.Array:
  """Pearson's kurtosis of all entries of ``w`` (3 for a Gaussian, 1.8 uniform; 0 for a
  constant tensor); differentiable, the KURE penalty's measure."""
  z = w - jnp.mean(w)
  m2 = jnp.mean(jnp.square(z))
  return jnp.mean(jnp.square(jnp.square(z))) / jnp.maximum(jnp.square(m2), 1e-30)


@jax.jit
def channel_ratio(w: jax.Array) -> jax.Array:
  """``max|w| / rms(w)`` per output channel of an HWIO kernel, ``(Cout,)`` (0 for an
  all-zero channel); differentiable, the ``channel_max`` penalty's measure."""
  w = w.reshape(-1, w.shape[-1])
  return jnp.max(jnp.abs(w), axis=0) * jax.lax.rsqrt(
      jnp.maximum(jnp.mean(jnp.square(w), axis=0), 1e-30))


def kernel_stats(w: np.ndarray) -> dict[str, float]:
  """Outlier statistics of one weight tensor (all entries pooled).

  ``max_over_std``: ``max|w - mean| / std``; ``kurtosis``: Pearson's
  (fourth standardized moment; 3 for a Gaussian); ``frac_beyond_{3,6}std``:
  fraction of entries with ``|w - mean| > k * std``.
  """
  w = np.asarray(w, np.float64).ravel()
  z = w - w.mean()
  std = z.std()
  if std == 0:
    return {"max_over_std": 0.0, "kurtosis": 0.0, "frac_beyond_3std": 0.0,
            "frac_beyond_6std": 0.0}
  a = np.abs(z / std)
  return {"max_over_std": float(a.max()), "kurtosis": float(kurtosis(jnp.asarray(w, jnp.float32))),
          "frac_beyond_3std": float(np.mean(a > 3)), "frac_beyond_6std": float(np.mean(a > 6))}


def outlier_stats(variables: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """Per-layer :func:`kernel_stats` of the merged kernels, plus ``"summary"``
  (the max over layers of ``max_over_std`` and ``kurtosis``, and the mean of
  the fractions)."""
  per_layer = {k: kernel_stats(w) for k, w in merged_kernels(variables).items()}
  rows = list(per_layer.values())
  per_layer["summary"] = {
      "max_over_std": max(r["max_over_std"] for r in rows),
      "kurtosis": max(r["kurtosis"] for r in rows),
      "frac_beyond_3std": float(np.mean([r["frac_beyond_3std"] for r in rows])),
      "frac_beyond_6std": float(np.mean([r["frac_beyond_6std"] for r in rows])),
  }
  return per_layer


def zero_fraction(variables: Mapping[str, Any], bits: int,
                  clipping: str = "minmax") -> dict[str, float]:
  """Per merged block kernel: the fraction of its weights that a per-output-channel
  uniform grid of ``bits`` (signed, ``repvgg_jax.quant.uniform``) rounds to zero.

  With min-max clipping the step is ``max|w| / (2^(b-1) - 1)`` per channel, so a
  weight survives only above half a step: at 2 bits (step = ``max|w|``) only
  weights above ``max|w| / 2``, i.e. above ``ratio / 2`` times the channel's rms.
  ``clipping="mse"`` takes the step of :func:`repvgg_jax.quant.uniform.mse_step`.
  """
  from repvgg_jax.quant import uniform
  bits = uniform.check_uniform_bits(bits)
  if clipping not in uniform.CLIPPINGS:
    raise ValueError(f"clipping={clipping!r}: expected one of {uniform.CLIPPINGS}")
  qmin, qmax = uniform.int_range(bits, True)
  step_fn = uniform.minmax_step if clipping == "minmax" else uniform.mse_step
  out = {}
  for name, w in merged_kernels(variables).items():
    w = np.asarray(w, np.float32)
    step = np.asarray(step_fn(w, bits, per_channel=True))
    k = np.asarray(uniform.int_values(w.reshape(-1, w.shape[-1]), step, qmin, qmax))
    out[name] = float(np.mean(k == 0))
  return out


# Per-channel outliers: what a symmetric per-output-channel quantizer sees.

UNKNOWN = "unknown"


def _channel_ratio(w: np.ndarray) -> np.ndarray:
  """:func:`channel_ratio` of a host kernel, as float64 numpy."""
  return np.asarray(channel_ratio(jnp.asarray(w, jnp.float32)), np.float64)


def _block_branches(params: Mapping[str, Any], stats: Mapping[str, Any],
                    path: tuple[str, ...]) -> dict[str, np.ndarray]:
  """One train-form block's merged kernel and each branch's folded
  contribution, all as 3x3 HWIO float64 arrays."""
  parts = {b: np.asarray(k, np.float64)
           for b, (k, _) in block_branches(params, stats, path).items()}
  return {"merged": sum(parts.values()), **parts}


def _attribute(merged: np.ndarray, parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  cout = merged.shape[-1]
  flat = np.abs(merged.reshape(-1, cout))
  idx = flat.argmax(axis=0)
  tap = np.stack(np.unravel_index(idx, merged.shape[:3]), axis=-1)
  o = np.arange(cout)
  # Each branch's contribution at the channel's largest merged weight; the
  # 1x1 and identity parts are zero off their taps, so off-centre it is 3x3.
  contrib = np.stack([np.abs(parts[b][tap[:, 0], tap[:, 1], tap[:, 2], o])
                      if b in parts else np.zeros(cout) for b in BRANCHES])
  return {"branch": np.asarray(BRANCHES)[contrib.argmax(axis=0)].astype(object),
          "tap": tap, "ratio_3x3": _channel_ratio(parts["3x3"])}


def channel_outliers(variables: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """Per output channel of every merged block kernel: the outlier a
  per-channel quantizer sees, and the branch it comes from.

  ``ratio[o] = max|W[..., o]| / rms(W[..., o])`` with ``rms = sqrt(mean(w^2))``
  over the channel's ``3 * 3 * Cin/groups`` merged weights. A symmetric
  per-channel quantizer's grid is zero-centred and spans ``max|w|``; the rms
  (not the std) is the weights' spread about that same zero, so the ratio is
  the range in units of the channel's typical weight: 1 for a flat channel,
  at most ``sqrt(9 * Cin/groups)`` (one non-zero weight).

  Args:
    variables: train-form ``{"params", "batch_stats", "settings"}`` (BN or OABN) or
      deploy-form ``{"params"}`` variables of a RepVGG.
  Returns:
    ``{layer: {...}}`` with layer names as in :func:`merged_kernels`:

    * ``ratio``: ``(Cout,)`` float64;
    * ``branch``: ``(Cout,)`` str, which branch's folded contribution is the
      largest at the channel's largest-magnitude merged weight: ``"3x3"``,
      ``"1x1"`` (the centre tap) or ``"identity"`` (the centre tap
      ``[1, 1, o % (Cin/groups), o]``); ``"unknown"`` for deploy-form input,
      which has no branches;
    * train form only: ``tap``: ``(Cout, 3)`` int, the ``(kh, kw, cin)`` of
      that weight; ``ratio_3x3``: ``(Cout,)``, the ratio of the folded 3x3
      branch alone (identity and 1x1 taps left out).
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("channel_outliers: expected a variables dict with a 'params' collection")
  if "batch_stats" not in variables:
    kernels = merged_kernels(variables)
    return {k: {"ratio": _channel_ratio(kernels[k]),
                "branch": np.full(kernels[k].shape[-1], UNKNOWN, dtype=object)}
            for k in sorted(kernels, key=_layer_order)}
  merge(variables)  # validates the whole tree (names the bad variable)
  out = {}

  def walk(params: Mapping[str, Any], stats: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for name, sub in params.items():
      if not isinstance(sub, Mapping):
        continue
      sub_stats = stats.get(name, {})
      if "conv_kxk" in sub:
        parts = _block_branches(sub, sub_stats, path + (name,))
        out["/".join(path[1:] + (name,))] = {"ratio": _channel_ratio(parts["merged"]),
                                             **_attribute(parts["merged"], parts)}
      else:
        walk(sub, sub_stats, path + (name,))

  walk(variables["params"], norm_state(variables), ("params",))
  return {k: out[k] for k in sorted(out, key=_layer_order)}


def _layer_order(name: str) -> tuple:
  """The stem first, then ``stages_i_j`` in network order (not 10 before 2)."""
  return name != "stem", [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def channel_outlier_summary(per_layer: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
  """JSON-ready summary of :func:`channel_outliers`.

  ``worst_ratio`` over all channels and layers, with its ``worst_layer``,
  ``worst_channel`` and ``worst_branch``; ``branch_counts``: channels per
  dominating branch; ``worst_ratio_3x3`` (and its layer, channel): the same
  with the identity and 1x1 taps left out (the 3x3 branch alone; ``None``
  for deploy-form input); ``layers`` and ``channels`` counted.
  """
  if not per_layer:
    raise ValueError("channel_outlier_summary: no merged block kernels")

  def worst(key: str) -> tuple[float, str, int]:
    layer = max(per_layer, key=lambda k: per_layer[k][key].max())
    o = int(per_layer[layer][key].argmax())
    return float(per_layer[layer][key][o]), layer, o

  ratio, layer, o = worst("ratio")
  counts = {b: 0 for b in BRANCHES + (UNKNOWN,)}
  for r in per_layer.values():
    for b in r["branch"]:
      counts[str(b)] += 1
  out = {"worst_ratio": ratio, "worst_layer": layer, "worst_channel": o,
         "worst_branch": str(per_layer[layer]["branch"][o]),
         "branch_counts": {b: n for b, n in counts.items() if n},
         "worst_ratio_3x3": None, "worst_3x3_layer": None, "worst_3x3_channel": None,
         "layers": len(per_layer),
         "channels": int(sum(len(r["ratio"]) for r in per_layer.values()))}
  if all("ratio_3x3" in r for r in per_layer.values()):
    ratio3, layer3, o3 = worst("ratio_3x3")
    out.update(worst_ratio_3x3=ratio3, worst_3x3_layer=layer3, worst_3x3_channel=o3)
  return out


def channel_outlier_table(per_layer: Mapping[str, Mapping[str, np.ndarray]]) -> str:
  """Markdown table, one row per layer: channels, worst channel ratio, its
  channel and branch, the median channel ratio, the 3x3 branch alone's worst
  ratio, and the channels per dominating branch."""
  lines = ["| layer | channels | worst max/rms | channel | branch | median max/rms "
           "| worst 3x3 alone | 3x3 / 1x1 / identity channels |",
           "|---|---:|---:|---:|---|---:|---:|---:|"]
  for layer, r in per_layer.items():
    o = int(r["ratio"].argmax())
    r3 = f"{r['ratio_3x3'].max():.2f}" if "ratio_3x3" in r else "n/a"
    counts = " / ".join(str(int(np.sum(r["branch"] == b))) for b in BRANCHES)
    if np.all(r["branch"] == UNKNOWN):
      counts = "unknown"
    lines.append(f"| {layer} | {len(r['ratio'])} | {r['ratio'][o]:.2f} | {o} | {r['branch'][o]} "
                 f"| {np.median(r['ratio']):.2f} | {r3} | {counts} |")
  return "\n".join(lines) + "\n"


def bound_factors(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Per output channel, the factor OABN's bound scales a BN's effective scale by in the
  merge (1: the bound is inactive there). ``branch`` form: per block, the factor on its
  identity and 1x1 branches (``repvgg_jax.models.oabn.branch_bound``), read as the
  identity tap's folded scale with the recorded bound over the same without it (the 1x1
  tap's where there is no identity). ``median`` form: per OABN layer
  (``"stages_2_3/identity"``, ``"stages_2_3/conv_kxk"``, ...), ``bound(s) / s``
  (``repvgg_jax.models.oabn.bound``). Layers without a bound are left out. Train-form
  variables."""
  stats = norm_state(variables)
  out = {}
  for name, p in variables["params"].items():
    st = stats.get(name)
    if not isinstance(st, Mapping):
      continue
    if "bound_tau" in st:
      raw = dict(variables["batch_stats"][name])  # no settings: the plain BN's scales
      branch = "identity" if "identity" in p else "1x1"
      bounded, plain = (np.asarray(block_branches(p, bst)[branch][0][1, 1], np.float64)
                        for bst in (st, raw))
      # One factor per channel: read it where the branch's tap is largest.
      i = np.abs(plain).argmax(axis=0)
      o = np.arange(plain.shape[1])
      out[name] = np.where(plain[i, o] != 0, bounded[i, o] / np.where(plain[i, o] != 0,
                                                                       plain[i, o], 1.0), 1.0)
      continue
    for path, bn_stats in _median_bns(st):
      bn = functools.reduce(lambda d, k: d[k], path, p)
      scale = np.asarray(bn_scale(bn, bn_stats, BN_EPSILON))  # as merged
      bounded = np.asarray(bound(scale, bn_stats))
      out["/".join((name, *path[:1]))] = np.where(
          scale != 0, bounded / np.where(scale != 0, scale, 1.0), 1.0).astype(np.float64)
  return dict(sorted(out.items(), key=lambda kv: (_layer_order(kv[0].split("/")[0]), kv[0])))


def _median_bns(stats: Mapping[str, Any], path: tuple[str, ...] = ()) -> list:
  """``(path, stats)`` of every BN under ``stats`` that records a ``median`` bound."""
  if "tau" in stats and "var" in stats:
    return [(path, stats)]
  return [hit for k, v in stats.items() if isinstance(v, Mapping)
          for hit in _median_bns(v, path + (k,))]

"""Outlier statistics and weight histograms of merged (deploy) kernels."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from repvgg_jax.reparam import merge

STAT_NAMES = ("max_over_std", "kurtosis", "frac_beyond_3std", "frac_beyond_6std")


def merged_kernels(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{"stem": kernel, "stages_0_0": kernel, ...}``: every block's merged 3x3
  kernel (HWIO). Train-form variables are merged first; deploy-form ones are
  read as they are."""
  params = merge(variables)["params"]
  out = {}

  def walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for name, sub in tree.items():
      if name == "reparam_conv":
        out["/".join(path)] = np.asarray(sub["kernel"], np.float64)
      elif isinstance(sub, Mapping):
        walk(sub, path + (name,))

  walk(params, ())
  return out


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
  z = z / std
  a = np.abs(z)
  return {"max_over_std": float(a.max()), "kurtosis": float(np.mean(z ** 4)),
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


def plot_weight_histograms(named_variables: Mapping[str, Mapping[str, Any]], path: str | None = None,
                           *, bins: int = 200, log: bool = True):
  """Histograms of all merged-kernel weights, one panel per model, side by side.

  Each layer's kernel is divided by its own std, so panels share the x axis
  (in std units) and outliers show as far tails.

  Args:
    named_variables: e.g. ``{"BN": variables_bn, "OABN": variables_oabn}``
      (train or deploy form).
    path: if given, the figure is saved there (PNG/PDF by extension).
    bins: histogram bins.
    log: log-scale counts.
  Returns:
    The matplotlib ``Figure``.
  """
  import matplotlib
  if path is not None:
    matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  n = len(named_variables)
  if n == 0:
    raise ValueError("plot_weight_histograms: named_variables is empty")
  fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), sharey=True, squeeze=False)
  for ax, (label, variables) in zip(axes[0], named_variables.items()):
    kernels = merged_kernels(variables).values()
    z = np.concatenate([(w.ravel() - w.mean()) / (w.std() or 1.0) for w in kernels])
    s = outlier_stats(variables)["summary"]
    ax.hist(z, bins=bins, log=log, color="tab:blue")
    ax.set_title(f"{label}: max|w|/std {s['max_over_std']:.1f}, kurtosis {s['kurtosis']:.1f}")
    ax.set_xlabel("merged weight / layer std")
  axes[0][0].set_ylabel("count" + (" (log)" if log else ""))
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=120)
  return fig

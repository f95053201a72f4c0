"""Figures of the outlier statistics of :mod:`repvgg_jax.analysis` (matplotlib; a
``path`` given selects the Agg backend and saves there)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from repvgg_jax.analysis import (UNKNOWN, channel_outlier_summary, merged_kernels,
                                 outlier_stats)


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


_COLORS = {"3x3": "tab:blue", "1x1": "tab:orange", "identity": "tab:red", UNKNOWN: "tab:gray"}


def plot_channel_outliers(per_layer: Mapping[str, Mapping[str, np.ndarray]],
                          path: str | None = None, *, title: str = ""):
  """Two panels from :func:`channel_outliers`: per layer the worst channel's
  ``max|w|/rms`` (bars coloured by its branch, the 3x3 branch alone as dots),
  and every channel of the worst layer (coloured by branch).

  Returns the matplotlib ``Figure``; saved to ``path`` if given.
  """
  import matplotlib
  if path is not None:
    matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch

  s = channel_outlier_summary(per_layer)
  layers = list(per_layer)
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
  worst_o = [int(per_layer[k]["ratio"].argmax()) for k in layers]
  x = np.arange(len(layers))
  ax0.bar(x, [per_layer[k]["ratio"][o] for k, o in zip(layers, worst_o)],
          color=[_COLORS[str(per_layer[k]["branch"][o])] for k, o in zip(layers, worst_o)])
  if s["worst_ratio_3x3"] is not None:
    ax0.plot(x, [per_layer[k]["ratio_3x3"].max() for k in layers], "k.", label="3x3 alone")
  ax0.set_xticks(x, layers, rotation=60, ha="right", fontsize=7)
  ax0.set_ylabel("worst channel max|w|/rms")
  ax0.set_title(f"{title + ': ' if title else ''}worst channel per layer")
  used = sorted({str(per_layer[k]["branch"][o]) for k, o in zip(layers, worst_o)},
                key=list(_COLORS).index)
  handles = [Patch(color=_COLORS[b], label=b) for b in used]
  ax0.legend(handles=handles + ax0.get_legend_handles_labels()[0], fontsize=7)

  r = per_layer[s["worst_layer"]]
  ch = np.arange(len(r["ratio"]))
  ax1.scatter(ch, r["ratio"], s=8, c=[_COLORS[str(b)] for b in r["branch"]])
  if "ratio_3x3" in r:
    ax1.plot(ch, r["ratio_3x3"], color="k", lw=0.6, label="3x3 alone")
  used = [b for b in _COLORS if np.any(r["branch"] == b)]
  ax1.legend(handles=[Patch(color=_COLORS[b], label=b) for b in used]
             + ax1.get_legend_handles_labels()[0], fontsize=7)
  ax1.set_xlabel("output channel")
  ax1.set_ylabel("max|w|/rms")
  ax1.set_title(f"{s['worst_layer']}: every channel")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=120)
  return fig

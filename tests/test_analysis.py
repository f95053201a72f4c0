"""Outlier statistics and histograms of merged kernels."""

import matplotlib
matplotlib.use("Agg")

import jax.numpy as jnp
import numpy as np
import pytest

from repvgg_jax.analysis import kernel_stats, merged_kernels, outlier_stats, plot_weight_histograms
from repvgg_jax.models.repvgg import RepVGG, Variant
from _util import random_variables

NET = Variant((1, 1, 2, 1), (0.25, 0.25, 0.25, 0.25))


def test_kernel_stats_of_a_gaussian():
  w = np.random.default_rng(0).standard_normal(400_000)
  s = kernel_stats(w)
  assert s["kurtosis"] == pytest.approx(3.0, abs=0.05)
  assert s["frac_beyond_3std"] == pytest.approx(0.0027, abs=0.0005)
  assert s["frac_beyond_6std"] == 0.0
  assert 4.0 < s["max_over_std"] < 6.0


def test_kernel_stats_see_a_single_outlier():
  w = np.random.default_rng(0).standard_normal(10_000)
  w[7] = 100.0
  s = kernel_stats(w)
  assert s["max_over_std"] > 50
  assert s["frac_beyond_6std"] == pytest.approx(1e-4)


def test_outlier_stats_per_merged_layer_and_summary():
  x = jnp.zeros((1, 32, 32, 3))
  v = random_variables(RepVGG(NET, num_classes=3), x)
  stats = outlier_stats(v)
  assert set(stats) == {"stem", "stages_0_0", "stages_1_0", "stages_2_0", "stages_2_1",
                        "stages_3_0", "summary"}
  assert stats["summary"]["max_over_std"] == max(
      r["max_over_std"] for k, r in stats.items() if k != "summary")
  assert merged_kernels(v)["stages_2_1"].shape == (3, 3, 64, 64)


def test_histogram_figure_has_one_panel_per_model(tmp_path):
  x = jnp.zeros((1, 32, 32, 3))
  bn = random_variables(RepVGG(NET, num_classes=3), x, tiny_var_channels=1)
  oabn = random_variables(RepVGG(NET, num_classes=3, norm="oabn"), x, tiny_var_channels=1)
  fig = plot_weight_histograms({"BN": bn, "OABN": oabn}, tmp_path / "hist.png")
  assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["BN", "OABN"]
  assert (tmp_path / "hist.png").stat().st_size > 10_000

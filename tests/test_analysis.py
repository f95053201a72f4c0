"""Outlier statistics and histograms of merged kernels."""

import matplotlib
matplotlib.use("Agg")

import jax.numpy as jnp
import numpy as np
import pytest

from repvgg_jax import analysis, merge
from repvgg_jax.analysis import (channel_outlier_summary, channel_outlier_table, channel_outliers,
                                 kernel_stats, merged_kernels, outlier_stats)
from repvgg_jax.plots import plot_channel_outliers, plot_weight_histograms
from repvgg_jax.models.repvgg import RepVGG
from _util import random_variables, tiny_variant

NET = tiny_variant((1, 1, 2, 1))


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


EPS = 1e-5


def _bn(c, gamma, var):
  return ({"scale": np.full(c, gamma, np.float32) if np.isscalar(gamma) else gamma,
           "bias": np.zeros(c, np.float32)},
          {"mean": np.zeros(c, np.float32),
           "var": np.full(c, var, np.float32) if np.isscalar(var) else var})


def _block(cin, cout, groups=1, g3=1.0, g1=0.01, id_gamma=None, id_var=None, seed=0):
  """One hand-built train-form block ``{"params", "batch_stats"}`` under "blk":
  3x3 kernel ~ N(0, 0.3^2), 1x1 kernel ~ N(0, 1), BN variances 1 unless given,
  an identity BN when ``id_gamma`` is given."""
  rng = np.random.default_rng(seed)
  k3 = (0.3 * rng.standard_normal((3, 3, cin // groups, cout))).astype(np.float32)
  k1 = rng.standard_normal((1, 1, cin // groups, cout)).astype(np.float32)
  p3, s3 = _bn(cout, g3, 1.0)
  p1, s1 = _bn(cout, g1, 1.0)
  params = {"conv_kxk": {"conv": {"kernel": k3}, "bn": p3},
            "conv_1x1": {"conv": {"kernel": k1}, "bn": p1}}
  stats = {"conv_kxk": {"bn": s3}, "conv_1x1": {"bn": s1}}
  if id_gamma is not None:
    params["identity"], stats["identity"] = _bn(cout, id_gamma, id_var)
  return {"params": {"blk": params}, "batch_stats": {"blk": stats}}


def _by_hand(v):
  """The merged kernel of ``_block``'s block, float64, without repvgg_jax."""
  p, s = v["params"]["blk"], v["batch_stats"]["blk"]
  scale = lambda name: p[name]["bn"]["scale"] / np.sqrt(s[name]["bn"]["var"] + EPS)
  w = p["conv_kxk"]["conv"]["kernel"].astype(np.float64) * scale("conv_kxk")
  w[1, 1] += p["conv_1x1"]["conv"]["kernel"][0, 0] * scale("conv_1x1")
  if "identity" in p:
    cin_g, cout = w.shape[2:]
    s_id = p["identity"]["scale"] / np.sqrt(s["identity"]["var"] + EPS)
    for o in range(cout):
      w[1, 1, o % cin_g, o] += s_id[o]
  return w


def _ratio(w):
  return np.abs(w).max() / np.sqrt(np.mean(w ** 2))


def test_dead_identity_channel_is_the_outlier_of_its_channel():
  var = np.ones(4, np.float32)
  var[2] = 1e-6
  v = _block(4, 4, id_gamma=0.05, id_var=var)
  r = channel_outliers(v)["blk"]
  assert list(r["branch"]) == ["3x3", "3x3", "identity", "3x3"]
  np.testing.assert_array_equal(r["tap"][2], [1, 1, 2])
  w = _by_hand(v)
  assert r["ratio"][2] == pytest.approx(_ratio(w[..., 2]), rel=1e-5)
  assert r["ratio"][2] > 5  # 0.05 / sqrt(1.1e-5) = 15.1 against 3x3 weights ~0.3
  np.testing.assert_allclose(r["ratio"], [_ratio(w[..., o]) for o in range(4)], rtol=1e-5)
  assert r["ratio_3x3"][2] < r["ratio"][2] / 2


def test_dominant_1x1_centre_tap_is_attributed_to_the_1x1_branch():
  gamma1 = np.full(4, 0.01, np.float32)
  gamma1[1] = 10.0
  v = _block(3, 4, g1=gamma1)  # Cin != Cout: no identity branch
  r = channel_outliers(v)["blk"]
  assert list(r["branch"]) == ["3x3", "1x1", "3x3", "3x3"]
  assert tuple(r["tap"][1][:2]) == (1, 1)
  w = _by_hand(v)
  assert r["ratio"][1] == pytest.approx(_ratio(w[..., 1]), rel=1e-5)


def test_plain_3x3_block_ratio_is_the_3x3_branch_alone():
  v = _block(4, 8, g1=0.0)  # the 1x1 branch folds to zero
  r = channel_outliers(v)["blk"]
  assert set(r["branch"]) == {"3x3"}
  np.testing.assert_allclose(r["ratio"], r["ratio_3x3"], rtol=1e-6)
  w = _by_hand(v)
  np.testing.assert_allclose(r["ratio"], [_ratio(w[..., o]) for o in range(8)], rtol=1e-5)


def test_grouped_identity_tap_sits_at_o_mod_cin_per_group():
  var = np.ones(4, np.float32)
  var[3] = 1e-6
  v = _block(4, 4, groups=2, id_gamma=0.05, id_var=var)
  r = channel_outliers(v)["blk"]
  assert list(r["branch"]) == ["3x3", "3x3", "3x3", "identity"]
  np.testing.assert_array_equal(r["tap"][3], [1, 1, 3 % 2])
  assert r["ratio"][3] == pytest.approx(_ratio(_by_hand(v)[..., 3]), rel=1e-5)


def test_deploy_form_gives_the_ratio_only():
  x = jnp.zeros((1, 32, 32, 3))
  v = random_variables(RepVGG(NET, num_classes=3), x, tiny_var_channels=1)
  train, deploy = channel_outliers(v), channel_outliers(merge(v))
  assert list(deploy) == list(train)
  for k in train:
    np.testing.assert_allclose(deploy[k]["ratio"], train[k]["ratio"], rtol=1e-6)
    assert set(deploy[k]["branch"]) == {"unknown"}
    assert "ratio_3x3" not in deploy[k]
  s = channel_outlier_summary(deploy)
  assert s["branch_counts"] == {"unknown": s["channels"]}
  assert s["worst_ratio_3x3"] is None


def test_summary_of_a_model_with_dead_identity_channels():
  x = jnp.zeros((1, 32, 32, 3))
  v = random_variables(RepVGG(NET, num_classes=3), x, tiny_var_channels=1)
  per = channel_outliers(v)
  assert list(per) == ["stem", "stages_0_0", "stages_1_0", "stages_2_0", "stages_2_1",
                       "stages_3_0"]
  # Only stages_2_1 has an identity branch; its dead channel 0 is the worst.
  assert per["stages_2_1"]["branch"][0] == "identity"
  s = channel_outlier_summary(per)
  assert (s["worst_layer"], s["worst_channel"], s["worst_branch"]) == ("stages_2_1", 0, "identity")
  assert s["worst_ratio"] == max(r["ratio"].max() for r in per.values())
  assert s["worst_ratio_3x3"] == max(r["ratio_3x3"].max() for r in per.values())
  assert s["worst_ratio_3x3"] < s["worst_ratio"]
  assert sum(s["branch_counts"].values()) == s["channels"] == sum(len(r["ratio"])
                                                                 for r in per.values())


def test_grouped_model_attributes_per_group_identity_taps():
  g2 = tiny_variant((1, 1, 2, 1), groups=2)
  v = random_variables(RepVGG(g2, num_classes=3), jnp.zeros((1, 32, 32, 3)), tiny_var_channels=1)
  r = channel_outliers(v)["stages_2_1"]  # a grouped layer with an identity branch
  cin_g = v["params"]["stages_2_1"]["conv_kxk"]["conv"]["kernel"].shape[2]
  assert cin_g == 32
  idx = np.flatnonzero(r["branch"] == "identity")
  assert 0 in idx
  np.testing.assert_array_equal(r["tap"][idx], np.stack([np.ones_like(idx), np.ones_like(idx),
                                                         idx % cin_g], axis=-1))


def test_channel_outlier_table_and_figure(tmp_path):
  x = jnp.zeros((1, 32, 32, 3))
  per = channel_outliers(random_variables(RepVGG(NET, num_classes=3), x, tiny_var_channels=1))
  table = channel_outlier_table(per).splitlines()
  assert len(table) == 2 + len(per)
  row = next(line for line in table if line.startswith("| stages_2_1 |"))
  assert f"| {per['stages_2_1']['ratio'].max():.2f} | 0 | identity |" in row
  fig = plot_channel_outliers(per, tmp_path / "channels.png", title="BN")
  assert fig.axes[1].get_title().startswith("stages_2_1")
  assert (tmp_path / "channels.png").stat().st_size > 10_000


def test_channel_outliers_name_a_missing_variable():
  v = _block(4, 4, id_gamma=0.05, id_var=1.0)
  del v["batch_stats"]["blk"]["identity"]["var"]
  with pytest.raises(ValueError, match="batch_stats/blk/identity/var"):
    channel_outliers(v)
  with pytest.raises(ValueError, match="'params' collection"):
    channel_outliers({"batch_stats": {}})


def test_zero_fraction_counts_weights_below_half_a_minmax_step():
  # One channel: an outlier of 10 and 99 weights of 1. Min-max at 2 bits: step 10
  # (qmax 1), so every 1 rounds to 0; at 4 bits step 10/7, 1/step = 0.7 -> 1.
  w = np.ones((3, 3, 11, 1), np.float32)
  w.reshape(-1)[0] = 10.0
  v = {"params": {"stem": {"reparam_conv": {"kernel": w, "bias": np.zeros(1)}}}}
  assert analysis.zero_fraction(v, 2)["stem"] == pytest.approx(98 / 99)
  assert analysis.zero_fraction(v, 4)["stem"] == 0.0
  assert analysis.zero_fraction(v, 2, "mse")["stem"] < 0.5  # MSE clips the outlier
  with pytest.raises(ValueError, match="bits=1"):
    analysis.zero_fraction(v, 1)
  with pytest.raises(ValueError, match="clipping='max'"):
    analysis.zero_fraction(v, 2, "max")


def test_bound_factors_of_the_median_form_are_each_bns_bounded_over_raw_scale():
  net = tiny_variant((1, 2, 1, 1))
  model = RepVGG(net, num_classes=5, norm="oabn", oabn_form="median", oabn_tau=1.5,
                 oabn_bound="clip")
  v = random_variables(model, jnp.zeros((1, 32, 32, 3)))
  f = analysis.bound_factors(v)
  assert {"stem/conv_kxk", "stages_1_1/identity", "stages_1_1/conv_1x1"} <= set(f)
  bn, st = v["params"]["stages_1_1"]["identity"], v["batch_stats"]["stages_1_1"]["identity"]
  s = np.abs(bn["scale"] / np.sqrt(st["var"] + 1e-5))
  limit = 1.5 * np.median(s)  # clip at tau x the layer's median |s|
  np.testing.assert_allclose(f["stages_1_1/identity"], np.minimum(s, limit) / s, rtol=1e-5)
  assert (f["stages_1_1/identity"] < 1).any() and (f["stages_1_1/identity"] == 1).any()


def test_bound_factors_are_the_branch_bounds_scale_per_channel():
  from repvgg_jax.models.oabn import branch_bound
  net = tiny_variant((1, 2, 1, 1))
  x = jnp.zeros((1, 32, 32, 3))
  model = RepVGG(net, num_classes=5, norm="oabn", oabn_form="branch", oabn_tau=1.0)
  v = random_variables(model, x, tiny_var_channels=2)
  f = analysis.bound_factors(v)
  assert set(f) == {n for n in v["params"] if "conv_kxk" in v["params"][n]}
  p, s = v["params"]["stages_1_1"], v["batch_stats"]["stages_1_1"]

  def scale(bn, stats):
    return bn["scale"] / np.sqrt(stats["var"] + 1e-5)
  s3 = scale(p["conv_kxk"]["bn"], s["conv_kxk"]["bn"])
  s1 = scale(p["conv_1x1"]["bn"], s["conv_1x1"]["bn"])
  si = scale(p["identity"], s["identity"])
  _, si_bounded = branch_bound(s3, p["conv_kxk"]["conv"]["kernel"], s1,
                               p["conv_1x1"]["conv"]["kernel"], si, 1.0, True)
  np.testing.assert_allclose(f["stages_1_1"], si_bounded / si, rtol=1e-4)
  assert f["stages_1_1"].min() < 0.5  # tau 1 cuts the dead channels' identity taps
  plain = random_variables(RepVGG(net, num_classes=5), x)
  assert analysis.bound_factors(plain) == {}

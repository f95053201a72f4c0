"""OABN: the bound, its equality across train/eval/merge, gradients."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import repvgg_jax as rv
from repvgg_jax.analysis import outlier_stats
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.nn.oabn import OABN, bound
from _util import random_variables, rel_err


def _settings(tau, relative, smooth):
  return {"tau": jnp.float32(tau), "relative": jnp.bool_(relative), "smooth": jnp.bool_(smooth)}


def _inputs_with_dead_channels(seed=0):
  """NHWC activations, 8 channels; channels 0 and 1 nearly constant."""
  x = np.random.default_rng(seed).standard_normal((16, 4, 4, 8)).astype(np.float32)
  x[..., 0] = 3.0 + 1e-4 * x[..., 0]
  x[..., 1] = -1.0 + 1e-3 * x[..., 1]
  return jnp.asarray(x)


class BoundTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_fixed(self):
    s = jnp.array([-5.0, -0.5, 0.0, 0.7, 3.0])
    out = self.variant(bound)(s, _settings(1.0, False, False))
    chex.assert_trees_all_close(out, jnp.array([-1.0, -0.5, 0.0, 0.7, 1.0]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_tanh_fixed(self):
    s = jnp.array([-50.0, 0.1, 2.0])
    out = self.variant(bound)(s, _settings(2.0, False, True))
    chex.assert_trees_all_close(out, 2.0 * jnp.tanh(s / 2.0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_relative_uses_median_abs_scale(self):
    s = jnp.array([1.0, -2.0, 3.0, 4.0, 100.0])  # median |s| = 3
    out = self.variant(bound)(s, _settings(2.0, True, False))
    chex.assert_trees_all_close(out, jnp.array([1.0, -2.0, 3.0, 4.0, 6.0]))

  def test_plain_batchnorm_stats_leave_scale_unbounded(self):
    s = jnp.array([1.0, 1e4])
    chex.assert_trees_all_equal(bound(s, {"mean": 0, "var": 1}), s)


@pytest.mark.parametrize("mode", ["clip", "tanh"])
@pytest.mark.parametrize("relative, tau", [(False, 2.0), (True, 3.0)])
def test_bound_holds_in_train_and_eval(mode, relative, tau):
  x = _inputs_with_dead_channels()
  layer = OABN(bound=mode, tau=tau, relative=relative)
  v = layer.init(jax.random.key(0), x, use_running_average=True)
  # Running stats that mirror a batch: two channels of tiny variance.
  v = {"params": v["params"],
       "batch_stats": {**v["batch_stats"], "mean": x.mean((0, 1, 2)), "var": x.var((0, 1, 2))}}
  raw = 1.0 / np.sqrt(np.asarray(x.var((0, 1, 2))) + 1e-5)
  limit = tau * np.median(raw) if relative else tau
  for train in (True, False):
    y, _ = layer.apply(v, x, use_running_average=not train, mutable=["batch_stats"])
    centred = np.asarray(x - x.mean((0, 1, 2)))
    s = np.asarray(y).reshape(-1, 8)[:, :].std(0) / centred.reshape(-1, 8).std(0)
    assert raw[0] > 10 * limit  # the dead channel would be an outlier ...
    assert np.all(s <= limit * (1 + 1e-4)), (train, s, limit)  # ... but is bounded


def test_oabn_equals_flax_batchnorm_when_bound_is_inactive():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5, 5, 6)), jnp.float32)
  bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  ob = OABN(momentum=0.9, epsilon=1e-5, bound="clip", tau=1e6, relative=False)
  vb = bn.init(jax.random.key(0), x, use_running_average=False)
  vo = ob.init(jax.random.key(0), x, use_running_average=False)
  for train in (True, False):
    yb, sb = bn.apply(vb, x, use_running_average=not train, mutable=["batch_stats"])
    yo, so = ob.apply(vo, x, use_running_average=not train, mutable=["batch_stats"])
    chex.assert_trees_all_close(yo, yb, atol=1e-5)
    chex.assert_trees_all_close(so["batch_stats"]["var"], sb["batch_stats"]["var"], atol=1e-6)
    chex.assert_trees_all_close(so["batch_stats"]["mean"], sb["batch_stats"]["mean"], atol=1e-6)


def test_bound_settings_live_in_variables_and_win_over_attributes():
  x = _inputs_with_dead_channels()
  layer = OABN(bound="clip", tau=1e6, relative=False)
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  assert set(v["batch_stats"]) == {"mean", "var", "tau", "relative", "smooth"}
  y_loose, _ = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  v["batch_stats"]["tau"] = jnp.float32(1.0)
  y_tight, _ = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert float(jnp.abs(y_loose[..., 0]).max()) > 10 * float(jnp.abs(y_tight[..., 0]).max())


@pytest.mark.parametrize("mode", ["clip", "tanh"])
def test_gradients_flow_through_the_bound(mode):
  # Channels 0, 1 have scale ~5x the median: over the bound, not saturating tanh.
  x = np.random.default_rng(0).standard_normal((16, 4, 4, 8)).astype(np.float32)
  x[..., :2] *= 0.2
  x = jnp.asarray(x)
  layer = OABN(bound=mode, tau=2.0, relative=True)
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  target = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)

  def loss(params):
    y, _ = layer.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                       use_running_average=False, mutable=["batch_stats"])
    return jnp.mean((y - target) ** 2)

  g = jax.grad(loss)(v["params"])
  chex.assert_tree_all_finite(g)
  assert np.all(np.asarray(g["bias"]) != 0)
  # Unbounded channels (2..7) always get a scale gradient; with tanh, bounded ones too.
  assert np.all(np.asarray(g["scale"][2:]) != 0)
  if mode == "tanh":
    assert np.all(np.asarray(g["scale"][:2]) != 0)
  else:  # clip: a clipped channel's gamma gets no gradient through the scale
    assert np.all(np.asarray(g["scale"][:2]) == 0)


def test_oabn_removes_merged_kernel_outliers_and_stays_exact():
  net = Variant((1, 2, 2, 1), (0.25, 0.25, 0.25, 0.25))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  stats = {}
  for norm in ("bn", "oabn"):
    model = RepVGG(net, num_classes=5, norm=norm, oabn_bound="clip", oabn_tau=2.0)
    v = random_variables(model, x, tiny_var_channels=1)
    y_deploy = RepVGG(net, num_classes=5, norm=norm, deploy=True).apply(rv.merge(v), x)
    assert rel_err(model.apply(v, x), y_deploy) <= 1e-5
    stats[norm] = outlier_stats(v)["summary"]["max_over_std"]
  assert stats["bn"] > 5 * stats["oabn"], stats

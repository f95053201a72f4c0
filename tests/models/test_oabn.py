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
from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.models.settings import check_settings
from repvgg_jax.models.oabn import OABN, bound, branch_bound
from _util import raises_naming, random_variables, rel_err, tiny_variant


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
  v = {**v, "batch_stats": {"mean": x.mean((0, 1, 2)), "var": x.var((0, 1, 2))}}
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


def test_attributes_drive_the_forward_and_settings_record_them():
  x = _inputs_with_dead_channels()
  layer = OABN(bound="clip", tau=1.0, relative=False)
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  assert set(v["batch_stats"]) == {"mean", "var"}  # running statistics only
  assert (float(v["settings"]["tau"]), bool(v["settings"]["relative"]),
          bool(v["settings"]["smooth"])) == (1.0, False, False)
  y, _ = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  v["settings"]["tau"] = jnp.float32(1e6)  # an edited record does not loosen the bound
  y_edited, _ = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  chex.assert_trees_all_equal(y, y_edited)
  assert float(jnp.abs(y[..., 0]).max()) < 1.0 + 1e-6  # |s| <= 1 on a ~constant channel


def test_branch_form_layer_records_nothing_and_hands_out_raw_scales():
  x = _inputs_with_dead_channels()
  layer = OABN(form="branch", tau=1.0)
  v = layer.init(jax.random.key(0), x, use_running_average=True)
  assert set(v) == {"params", "batch_stats"} and set(v["batch_stats"]) == {"mean", "var"}
  centred, s, beta = layer.apply(v, x, use_running_average=True, raw=True)
  chex.assert_trees_all_close(s, v["params"]["scale"] / jnp.sqrt(v["batch_stats"]["var"] + 1e-5))
  chex.assert_trees_all_close(centred, x - v["batch_stats"]["mean"])
  chex.assert_trees_all_equal(beta, v["params"]["bias"])


def _branch_inputs(seed=0, cin=6, cout=6):
  rng = np.random.default_rng(seed)
  k3 = rng.standard_normal((3, 3, cin, cout)).astype(np.float32) * 0.1
  k1 = rng.standard_normal((1, 1, cin, cout)).astype(np.float32) * 0.1
  s3 = rng.uniform(0.5, 2.0, cout).astype(np.float32)
  s1 = rng.uniform(0.5, 2.0, cout).astype(np.float32)
  s_id = rng.uniform(0.05, 0.1, cout).astype(np.float32)
  s_id[:2] = [50.0, -30.0]  # dead channels: huge identity scales
  k3[..., 5] = 0.0          # a channel without a 3x3 reference
  return map(jnp.asarray, (s3, k3, s1, k1, s_id))


def _extra_taps(s1, k1, s_id):
  cin, cout = k1.shape[2:]
  return s1 * k1[0, 0] + (0 if s_id is None else s_id * jnp.eye(cin, cout))


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("identity", [True, False])
def test_branch_bound_holds_per_channel(smooth, identity):
  s3, k3, s1, k1, s_id = _branch_inputs()
  s_id = s_id if identity else None
  tau = 1.5
  b1, b_id = jax.jit(branch_bound, static_argnums=(5, 6))(s3, k3, s1, k1, s_id, tau, smooth)
  assert (b_id is None) == (not identity)
  before = jnp.max(jnp.abs(_extra_taps(s1, k1, s_id)), axis=0)
  after = jnp.max(jnp.abs(_extra_taps(b1, k1, b_id)), axis=0)
  r3 = jnp.abs(s3) * jnp.sqrt(jnp.mean(k3 ** 2, axis=(0, 1, 2)))
  bounded = r3 > 0
  assert np.all(np.asarray(after[bounded]) <= tau * np.asarray(r3[bounded]) * (1 + 1e-6))
  # One factor per channel for both branches; the unreferenced channel is left alone.
  f = b1 / s1
  if identity:
    chex.assert_trees_all_close(b_id, f * s_id, rtol=1e-6)
    assert float(before[0]) > 10 * tau * float(r3[0])  # the dead channel was far out
  chex.assert_trees_all_close(f[5], 1.0)
  inside = np.asarray(before <= tau * r3) & np.asarray(bounded)
  if not smooth:
    chex.assert_trees_all_close(f[inside], jnp.ones(int(inside.sum())))
  else:
    assert np.all(np.asarray(f[bounded]) < 1.0)


def test_branch_bound_passes_gradients():
  s3, k3, s1, k1, s_id = _branch_inputs()

  def loss(s1, s_id):
    b1, b_id = branch_bound(s3, k3, s1, k1, s_id, 1.5, True)
    return jnp.sum(b1) + jnp.sum(b_id ** 2)

  g1, g_id = jax.grad(loss, argnums=(0, 1))(s1, s_id)
  chex.assert_tree_all_finite((g1, g_id))
  assert np.all(np.asarray(g_id) != 0)


def test_branch_form_bounds_every_merged_channel_and_merges_exactly():
  net = tiny_variant((1, 2, 2, 1), groups=2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  tau = 2.0
  model = RepVGG(net, num_classes=5, norm="oabn", oabn_form="branch", oabn_tau=tau)
  v = random_variables(model, x, tiny_var_channels=2)
  _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])  # the train-form forward runs
  v = {**v, "batch_stats": upd["batch_stats"]}
  deploy = RepVGG(net, num_classes=5, deploy=True)
  assert rel_err(model.apply(v, x), deploy.apply(rv.merge(v), x)) <= 1e-5
  for name, p in v["params"].items():
    if "conv_kxk" not in p:
      continue
    parts = rv.reparam.block_branches(p, rv.reparam.norm_state(v)[name])
    extra = parts["1x1"][0] + (parts["identity"][0] if "identity" in parts else 0.0)
    k3 = parts["3x3"][0].reshape(-1, extra.shape[-1])
    r3 = np.sqrt(np.mean(np.asarray(k3) ** 2, axis=0))
    peak = np.abs(np.asarray(extra)).reshape(-1, extra.shape[-1]).max(axis=0)
    assert np.all(peak <= tau * r3 * (1 + 1e-5)), name
  bn = {n: outlier_stats(w)["summary"]["max_over_std"] for n, w in
        (("bn", random_variables(RepVGG(net, num_classes=5), x, tiny_var_channels=2)),
         ("branch", v))}
  assert bn["bn"] > 3 * bn["branch"], bn


def test_check_settings_names_the_stored_and_the_configured_value():
  net = tiny_variant((1, 1, 1, 1))
  x = jnp.zeros((1, 16, 16, 3))
  median = RepVGG(net, num_classes=3, norm="oabn", oabn_form="median", oabn_tau=4.0)
  v = random_variables(median, x)
  check_settings(median, v)
  with raises_naming(ValueError, "bn/tau=4.0", "2.0"):
    check_settings(RepVGG(net, num_classes=3, norm="oabn", oabn_form="median", oabn_tau=2.0), v)
  with raises_naming(ValueError, "tau=4.0", "norm='bn'"):
    check_settings(RepVGG(net, num_classes=3), v)
  branch = RepVGG(net, num_classes=3, norm="oabn", oabn_form="branch", oabn_tau=3.0)
  with raises_naming(ValueError, "['bound_smooth', 'bound_tau']", "settings"):
    check_settings(branch, v)
  vb = random_variables(branch, x)
  check_settings(branch, vb)
  with raises_naming(ValueError, "bound_tau=3.0", "1.5"):
    check_settings(RepVGG(net, num_classes=3, norm="oabn", oabn_form="branch", oabn_tau=1.5), vb)


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
    y, _ = layer.apply({**v, "params": params}, x,
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
  net = tiny_variant((1, 2, 2, 1))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  stats = {}
  for norm in ("bn", "oabn"):
    model = RepVGG(net, num_classes=5, norm=norm, oabn_form="median", oabn_bound="clip",
                   oabn_tau=2.0)
    v = random_variables(model, x, tiny_var_channels=1)
    y_deploy = RepVGG(net, num_classes=5, norm=norm, deploy=True).apply(rv.merge(v), x)
    assert rel_err(model.apply(v, x), y_deploy) <= 1e-5
    stats[norm] = outlier_stats(v)["summary"]["max_over_std"]
  assert stats["bn"] > 5 * stats["oabn"], stats


def test_oabn_without_a_bound_is_flax_batchnorm_bit_for_bit():
  """BN and OABN share one statistics implementation, flax's: OABN(form=None), the model's
  norm="bn", equals flax.linen.BatchNorm in training (output and running statistics) and
  in eval, on inputs with a large mean."""
  x = 3.0 + jax.random.normal(jax.random.key(0), (8, 5, 5, 16)) * jnp.arange(1, 17) / 8
  ours = OABN(form=None, momentum=0.9, epsilon=1e-5)
  theirs = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  v = theirs.init(jax.random.key(1), x, use_running_average=False)
  v = {**v, "params": {"scale": jnp.linspace(0.5, 2.0, 16), "bias": jnp.linspace(-1, 1, 16)}}
  y_ours, up_ours = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  y_theirs, up_theirs = theirs.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  chex.assert_trees_all_equal(y_ours, y_theirs)
  chex.assert_trees_all_equal(up_ours, up_theirs)
  v = {**v, **up_ours}
  chex.assert_trees_all_equal(ours.apply(v, x, use_running_average=True),
                              theirs.apply(v, x, use_running_average=True))

  def grads(module):  # the backward pass too: what training sees
    def loss(params, x):
      y, _ = module.apply({**v, "params": params}, x, use_running_average=False,
                          mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y))
    return jax.grad(loss, argnums=(0, 1))(v["params"], x)
  # The backward pass agrees to rounding (XLA fuses the two graphs differently).
  chex.assert_trees_all_close(grads(ours), grads(theirs), rtol=1e-4, atol=1e-5)

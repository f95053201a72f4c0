"""Model zoo: names, structure, parameter counts, options."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.models.oabn import resolve_bound
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.train.state import init_variables
from _util import raises_naming, random_variables, rel_err

# Official train / deploy parameter counts in millions (RepVGG README, mmpretrain).
OFFICIAL_PARAMS_M = {
    "RepVGG-A0": (9.11, 8.31), "RepVGG-A1": (14.09, 12.79), "RepVGG-A2": (28.21, 25.49),
    "RepVGG-B0": (15.82, 14.34), "RepVGG-B1": (57.42, 51.83), "RepVGG-B1g2": (45.78, 41.36),
    "RepVGG-B1g4": (39.97, 36.13), "RepVGG-B2": (89.02, 80.32), "RepVGG-B2g4": (61.76, 55.78),
    "RepVGG-B3": (123.09, 110.96), "RepVGG-B3g4": (83.83, 75.63),
    "RepVGG-D2se": (133.33, 120.39),
}
X224 = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
SMALL = Variant((1, 2, 2, 1), (0.25, 0.25, 0.25, 0.5))


def param_count(model, x=X224):
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return sum(a.size for a in jax.tree.leaves(shapes["params"]))


def test_list_models_is_the_official_zoo():
  assert rv.list_models() == list(OFFICIAL_PARAMS_M)


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS_M))
def test_param_counts_match_official(name):
  train_m, deploy_m = OFFICIAL_PARAMS_M[name]
  # The official table truncates (A2 deploy: 25,499,944 -> 25.49).
  assert abs(param_count(rv.create_model(name)) / 1e6 - train_m) <= 0.01
  assert abs(param_count(rv.create_model(name, deploy=True)) / 1e6 - deploy_m) <= 0.01


def test_unknown_variant_names_valid_ones():
  with raises_naming(ValueError, "RepVGG-Z9", "RepVGG-A0", "RepVGG-D2se"):
    rv.create_model("RepVGG-Z9")


@pytest.mark.parametrize("alias", ["RepVGG-B1g4", "repvgg_b1g4", "b1g4", "RepVGG_B1G4"])
def test_name_aliases(alias):
  assert rv.create_model(alias).variant == rv.VARIANTS["RepVGG-B1g4"]


@pytest.mark.parametrize("kwargs, names", [
    ({"norm": "ln"}, ["norm='ln'"]),
    ({"num_classes": 0}, ["num_classes=0"]),
    ({"oabn_bound": "sigmoid"}, ["oabn_bound='sigmoid'"]),
    ({"oabn_tau": -1.0}, ["oabn_tau=-1.0"]),
    ({"widht": 2}, ["widht"]),
    ({"block": "qa"}, ["block='qa'"]),
    ({"oabn_form": "mean"}, ["oabn_form='mean'"]),
    # The conflict names both sides, and what would build.
    ({"norm": "oabn", "oabn_form": "branch", "block": "qarepvgg"},
     ["oabn_form='branch'", "block='qarepvgg'"]),
    ({"norm": "oabn", "block": "qarepvgg", "oabn_form": "branch"},
     ["oabn_form='median'", "block='repvgg'"]),
])
def test_bad_options_name_the_value(kwargs, names):
  with raises_naming(ValueError, *names):
    rv.create_model("RepVGG-A0", **kwargs)


def test_oabn_picks_its_form_by_depth_at_the_forms_default_tau():
  # A0's 14-block stage: median; the demo's (1, 2, 4, 1): branch; QARepVGG: median.
  model = rv.create_model("RepVGG-A0", norm="oabn")
  assert (model.bound_form, model.bound_tau, model.branch_bound()) == ("median", 4.0, None)
  assert all(resolve_bound(None, None, rv.create_model(n).variant.blocks) == ("median", 4.0)
             for n in rv.list_models())
  assert resolve_bound(None, 2.5, (1, 2, 4, 1)) == ("branch", 2.5)
  assert resolve_bound("median", None, (1, 2, 4, 1)) == ("median", 4.0)
  shallow = RepVGG(dataclasses.replace(model.variant, blocks=(1, 2, 4, 1)), norm="oabn")
  assert (shallow.bound_form, shallow.bound_tau, shallow.branch_bound()) == (
      "branch", 3.0, (3.0, True))
  deeper = RepVGG(dataclasses.replace(model.variant, blocks=(1, 2, 5, 1)), norm="oabn")
  assert deeper.bound_form == "median"
  assert RepVGG(shallow.variant, norm="oabn", block="qarepvgg").bound_form == "median"
  branch = rv.create_model("RepVGG-A0", norm="oabn", oabn_form="branch", oabn_tau=2.0)
  assert branch.branch_bound() == (2.0, True)


def test_bn_is_oabn_without_a_bound_bit_for_bit():
  """One batch-statistics implementation: norm="bn" (flax's BatchNorm) and an OABN whose
  bound never acts (median form, hard clip at 1e30 times the median) give the same
  training forward, the same running statistics and the same eval forward, bit for bit."""
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  bn = RepVGG(SMALL, num_classes=10, norm="bn")
  loose = RepVGG(bn.variant, num_classes=10, norm="oabn", oabn_form="median",
                 oabn_bound="clip", oabn_tau=1e30)
  v_bn = bn.init(jax.random.key(0), x)
  v_loose = loose.init(jax.random.key(0), x)
  chex.assert_trees_all_equal(v_bn["params"], v_loose["params"])
  v_loose = {**v_loose, "params": v_bn["params"]}
  y_bn, up_bn = bn.apply(v_bn, x, train=True, mutable=["batch_stats"])
  y_loose, up_loose = loose.apply(v_loose, x, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_equal(y_bn, y_loose)
  chex.assert_trees_all_equal(up_bn, up_loose)
  chex.assert_trees_all_equal(bn.apply(v_bn, x), loose.apply(v_loose, x))
  assert "settings" not in v_bn  # plain BN records no bound


def test_groups_on_even_layers_for_both_branches():
  shapes = jax.eval_shape(lambda x: rv.create_model("RepVGG-B1g4").init(jax.random.key(0), x), X224)
  p = shapes["params"]
  depths = rv.VARIANTS["RepVGG-B1g4"].blocks
  layer = 1
  for i, depth in enumerate(depths):
    for j in range(depth):
      blk = p[f"stages_{i}_{j}"]
      k3, k1 = blk["conv_kxk"]["conv"]["kernel"].shape, blk["conv_1x1"]["conv"]["kernel"].shape
      cin = p[f"stages_{i}_{j - 1}" if j else ("stem" if i == 0 else f"stages_{i - 1}_{depths[i - 1] - 1}")]
      cin = (cin["conv_kxk"]["conv"]["kernel"].shape[-1])
      groups = 4 if layer % 2 == 0 and layer <= 26 else 1
      assert k3 == (3, 3, cin // groups, k3[-1]), (layer, k3)
      assert k1 == (1, 1, cin // groups, k1[-1]), (layer, k1)
      layer += 1


def test_stem_and_stage_widths_a0():
  p = jax.eval_shape(lambda x: rv.create_model("A0").init(jax.random.key(0), x), X224)["params"]
  assert p["stem"]["conv_kxk"]["conv"]["kernel"].shape == (3, 3, 3, 48)
  assert [p[f"stages_{i}_0"]["conv_kxk"]["conv"]["kernel"].shape[-1] for i in range(4)] == [
      48, 96, 192, 1280]
  assert "identity" not in p["stages_0_0"] and "identity" in p["stages_0_1"]
  assert p["head"]["kernel"].shape == (1280, 1000)


def test_d2se_has_squeeze_excitation_in_every_block():
  p = jax.eval_shape(lambda x: rv.create_model("D2se").init(jax.random.key(0), x), X224)["params"]
  blocks = [k for k in p if k != "head"]
  assert len(blocks) == 1 + 8 + 14 + 24 + 1
  assert all(p[k]["se"]["down"]["kernel"].shape[1] == p[k]["se"]["up"]["kernel"].shape[0]
             == p[k]["se"]["up"]["kernel"].shape[1] // 16 for k in blocks)


@pytest.mark.parametrize("cifar_stem, size, final", [(False, 224, 7), (False, 32, 1),
                                                     (True, 32, 4), (False, 33, 2)])
def test_feature_map_sizes(cifar_stem, size, final):
  model = rv.create_model("A0", num_classes=10, cifar_stem=cifar_stem)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), v, x)
  out = state["intermediates"]["stages_3_0"]["__call__"][0]
  assert out.shape == (2, final, final, 1280)


def test_train_mode_updates_batch_stats_and_eval_does_not():
  model = RepVGG(SMALL, num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  v = init_variables(model, (32, 32, 3), seed=0)  # the trainer's init (batch_stats: 0 and 1)
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, upd = train_apply(v, x)
  assert logits.shape == (4, 10)
  before = v["batch_stats"]["stem"]["conv_kxk"]["bn"]["mean"]
  after = upd["batch_stats"]["stem"]["conv_kxk"]["bn"]["mean"]
  assert not np.allclose(before, after)
  eval_apply = jax.jit(model.apply)
  assert not np.allclose(eval_apply(v, x), logits)  # eval uses running statistics
  updated = {**v, "batch_stats": upd["batch_stats"]}
  assert not np.allclose(eval_apply(updated, x), eval_apply(v, x))  # ... the stored ones
  # Train mode normalizes with the batch's own statistics: the stored ones do not matter.
  np.testing.assert_allclose(train_apply(updated, x)[0], logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  m32 = RepVGG(SMALL, num_classes=10, norm="oabn")
  m16 = RepVGG(SMALL, num_classes=10, norm="oabn", dtype=jnp.bfloat16)
  v = random_variables(m32, x)
  shapes = jax.eval_shape(lambda: m16.init(jax.random.key(0), x))
  assert {a.dtype for a in jax.tree.leaves(shapes["params"])} == {jnp.dtype(jnp.float32)}
  y16, y32 = jax.jit(m16.apply)(v, x), jax.jit(m32.apply)(v, x)
  assert y16.dtype == jnp.float32
  assert 1e-4 < rel_err(y32, y16) < 5e-2  # really computed in bf16, and still close


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_qarepvgg_blocks_have_one_bn_after_the_sum(cifar_stem):
  # A0's stem (48 ch) feeds stage 0 (48 ch): an identity only when stage 0 has stride 1.
  model = rv.create_model("RepVGG-A0", num_classes=10, block="qarepvgg", cifar_stem=cifar_stem)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  for name in ("stem", "stages_0_0", "stages_0_1"):
    p, s = v["params"][name], v.get("settings", {}).get(name, {})
    assert set(p) == {"conv_kxk", "conv_1x1", "post_bn"}, name
    assert set(p["conv_1x1"]) == {"kernel"} and set(p["conv_kxk"]) == {"conv", "bn"}
    assert "identity_gain" not in v["batch_stats"][name]
    assert ("identity_gain" in s) == (name == "stages_0_1" or (cifar_stem and name == "stages_0_0"))
  deploy = rv.create_model("RepVGG-A0", num_classes=10, block="qarepvgg", deploy=True)
  plain = rv.create_model("RepVGG-A0", num_classes=10, deploy=True)
  shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(
      lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
  assert shapes(deploy) == shapes(plain)

"""merge / fold_bn: exactness and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG
from _util import raises_naming, random_variables, rel_err, tiny_variant

# A tiny network with every kind of block: strides 1/2, identity, g2 groups, SE.
TINY = tiny_variant((2, 2, 2, 1), groups=2, se=True)
# Every norm / block / OABN form and bound the model has.
SETTINGS = ([dict(norm="bn")]
            + [dict(norm="oabn", oabn_form="median", oabn_bound=b, oabn_relative=r, oabn_tau=t)
               for b in ("clip", "tanh") for r, t in ((True, 1.5), (False, 0.8))]
            + [dict(norm="oabn", oabn_form="branch", oabn_bound=b, oabn_tau=t)
               for b, t in (("clip", 1.0), ("tanh", 2.0))]
            + [dict(norm="bn", block="qarepvgg"),
               dict(norm="oabn", oabn_form="median", block="qarepvgg")])


def _images(size, n=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3)), jnp.float32)


# One variant per structure the zoo has: plain (A0), groups (B1g4; TINY above has g2
# groups), SE and the deepest stages (D2se). The other variants differ only in widths
# (A2's fractional multipliers among them), depths or group count, which change no step of
# the merge; the shape test below covers every one.
EXACT_VARIANTS = ("RepVGG-A0", "RepVGG-B1g4", "RepVGG-D2se")


@pytest.mark.parametrize("name", rv.list_models())
def test_every_variant_merges_to_its_deploy_tree(name):
  x = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
  init = lambda m: jax.eval_shape(lambda x: m.init(jax.random.key(0), x), x)  # noqa: E731
  train = init(rv.create_model(name, num_classes=10, norm="oabn"))
  deploy = init(rv.create_model(name, num_classes=10, norm="oabn", deploy=True))
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(rv.merge, train), deploy)


@pytest.mark.parametrize("name", EXACT_VARIANTS)
def test_merge_is_exact_for_every_structure_of_the_zoo(name):
  # Odd input size (33 px); norms alternate to bound the run time, every block kind x
  # every OABN mode is covered by the tiny tests below.
  # XLA's conv throughout: compiling the matmul convs of tiny maps for these
  # widths costs more than the test; tests/models/test_conv.py checks them against it.
  norm = "oabn" if EXACT_VARIANTS.index(name) % 2 else "bn"
  x = _images(33, n=1)
  model = rv.create_model(name, num_classes=10, norm=norm, conv_impl="xla")
  v = random_variables(model, x)
  deploy = rv.create_model(name, num_classes=10, norm=norm, deploy=True, conv_impl="xla")
  y = jax.jit(model.apply)(v, x)
  y_deploy = jax.jit(deploy.apply)(jax.jit(rv.merge)(v), x)
  assert rel_err(y, y_deploy) <= 1e-5


class MergeTinyTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(size=(32, 33), setting=tuple(range(len(SETTINGS))))
  def test_merge_exact_all_block_kinds(self, size, setting):
    kw = SETTINGS[setting]
    x = _images(size)
    model = RepVGG(TINY, num_classes=7, **kw)
    v = random_variables(model, x, tiny_var_channels=1)
    merged = self.variant(rv.merge)(v)
    y = model.apply(v, x)
    y_deploy = RepVGG(TINY, num_classes=7, deploy=True, **kw).apply(merged, x)
    assert rel_err(y, y_deploy) <= 1e-5

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 4)
  def test_identity_kernel_is_identity(self, groups):
    x = _images(5)
    x = jnp.concatenate([x] * 4, axis=-1)  # 12 channels
    k = self.variant(rv.identity_kernel, static_argnums=(0, 1))(12, groups)
    y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups)
    chex.assert_trees_all_close(y, x)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fold_bn_matches_conv_then_batchnorm(self):
    model = RepVGG(TINY, num_classes=3)
    x = _images(8)
    v = random_variables(model, x)
    p, s = v["params"]["stem"]["conv_kxk"], v["batch_stats"]["stem"]["conv_kxk"]
    k, b = self.variant(rv.fold_bn)(p["conv"]["kernel"], p["bn"], s["bn"])
    conv = lambda k: jax.lax.conv_general_dilated(
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bn = s["bn"]
    want = (conv(p["conv"]["kernel"]) - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-5) \
        * p["bn"]["scale"] + p["bn"]["bias"]
    chex.assert_trees_all_close(conv(k) + b, want, rtol=1e-5, atol=1e-5)


def test_merge_block_is_the_blocks_eval_forward():
  """The merged (kernel, bias) of a grouped block, run as one conv + ReLU on the block's
  input, gives the train-form block's eval output (captured inside the whole model)."""
  model = RepVGG(tiny_variant((2, 2, 2, 1), groups=2), num_classes=3)
  x = _images(8)
  v = random_variables(model, x)
  k, b = rv.merge_block(v["params"]["stages_0_1"], v["batch_stats"]["stages_0_1"])
  _, inter = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
  h = inter["intermediates"]["stages_0_0"]["__call__"][0]
  out = inter["intermediates"]["stages_0_1"]["__call__"][0]
  chex.assert_shape(k, (3, 3, 8, 16))  # 16 channels, 2 groups
  y = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", feature_group_count=2,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  np.testing.assert_allclose(jax.nn.relu(y), out, rtol=1e-4, atol=1e-4)


def test_merge_of_deploy_variables_is_identity():
  model = RepVGG(TINY, num_classes=3)
  merged = rv.merge(random_variables(model, _images(8)))
  chex.assert_trees_all_equal(rv.merge(merged), merged)


def _tiny_variables():
  return random_variables(RepVGG(TINY, num_classes=3), _images(8))


def _drop(tree, path):
  *head, last = path.split("/")
  for k in head:
    tree = tree[k]
  del tree[last]


@pytest.mark.parametrize("path, names", [
    ("params/stages_0_1/conv_1x1", ["params/stages_0_1/conv_1x1"]),
    ("params/stem/conv_kxk/bn/scale", ["params/stem/conv_kxk/bn/scale"]),
    ("batch_stats/stages_1_1/identity/var", ["batch_stats/stages_1_1/identity/var"]),
    # The identity BN's params gone: its batch_stats are the odd ones.
    ("params/stages_1_1/identity", ["['identity']", "batch_stats/stages_1_1"]),
])
def test_merge_names_missing_paths(path, names):
  v = _tiny_variables()
  _drop(v, path)
  with raises_naming(ValueError, *names):
    rv.merge(v)


def test_merge_names_misshaped_and_odd_variables():
  v = _tiny_variables()
  v["params"]["stem"]["conv_kxk"]["bn"]["scale"] = jnp.ones(5)
  with raises_naming(ValueError, "params/stem/conv_kxk/bn/scale", "(5,)"):
    rv.merge(v)
  v = _tiny_variables()
  v["params"]["stem"]["rbr_dense"] = {}
  with raises_naming(ValueError, "['rbr_dense']", "params/stem"):
    rv.merge(v)
  v = _tiny_variables()
  v["batch_stats"]["stage9"] = {}
  with raises_naming(ValueError, "['stage9']", "params"):
    rv.merge(v)
  with raises_naming(ValueError, "collection", "'quant'"):
    rv.merge({**_tiny_variables(), "quant": {}})
  with pytest.raises(ValueError, match="'params' collection"):
    rv.merge({"batch_stats": {}})


def test_qarepvgg_merge_refuses_a_bn_on_its_bare_branches():
  model = RepVGG(TINY, num_classes=3, block="qarepvgg")
  v = random_variables(model, _images(8))
  v["params"]["stages_1_1"]["identity"] = {"scale": jnp.ones(32), "bias": jnp.zeros(32)}
  with raises_naming(ValueError, "params/stages_1_1/identity", "post_bn"):
    rv.merge(v)
  v = random_variables(model, _images(8))
  del v["batch_stats"]["stages_1_1"]["post_bn"]
  with raises_naming(ValueError, "batch_stats/stages_1_1/post_bn"):
    rv.merge(v)

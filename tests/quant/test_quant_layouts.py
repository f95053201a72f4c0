"""Codebook layouts in the model: grouped codebooks (quant.granularity="group": g
consecutive output channels share one codebook) and vector codebooks (quant.cluster_dim=d:
one index per d input-channel weights). Fit, forward, packed file, StableHLO, size
accounting and bad values; quant/vector.py's own arithmetic is in test_quant_vector.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.quant import make_quantizer, mixed
from repvgg_jax.quant.packed import pack, read_packed
from repvgg_jax.quant.optimal import optimal_codebook
from repvgg_jax.quant.quantizer import by_group
from repvgg_jax.quant.rules import LayerRule

from _util import (assert_every_rule_matches, codebook_mse, raises_naming, random_variables,
                   vector_squared_error)

TINY = Variant((1, 1, 1, 1), (0.25, 0.25, 0.25, 0.125))  # 16, 32, 64, 64 channels


def _params(num_classes=5):
  x = jnp.zeros((1, 32, 32, 3))
  return jax.device_get(rv.merge(random_variables(RepVGG(TINY, num_classes=num_classes), x))[
      "params"])


def test_by_group_puts_each_groups_channels_in_one_column():
  w = np.arange(2 * 3 * 8).reshape(2, 3, 8)
  cols = np.asarray(by_group(jnp.asarray(w), 4))
  assert cols.shape == (2 * 3 * 4, 2)
  for i in range(2):
    np.testing.assert_array_equal(np.sort(cols[:, i]), np.sort(w[..., 4 * i:4 * i + 4].ravel()))
  np.testing.assert_array_equal(by_group(jnp.asarray(w), 1), w.reshape(-1, 8))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_grouped_fit_is_the_optimum_of_each_group(bits):
  w = np.random.default_rng(bits).standard_normal((3, 3, 4, 8)).astype(np.float32)
  q = make_quantizer("cluster", bits=bits, granularity="group", group_size=4,
                     first_last_bits=None)
  params = {"blk": {"kernel": jnp.asarray(w)}}
  book = np.asarray(q.init(params)["blk"]["kernel"])
  assert book.shape == (2, 2 ** bits)
  for i in range(2):
    group = w[..., 4 * i:4 * i + 4]
    # 144 values a group: the per-tensor DP is exact; equal errors (ties may move levels).
    best = optimal_codebook(group, bits)
    assert codebook_mse(group, book[i]) <= codebook_mse(group, best) * (1 + 1e-6) + 1e-12
  # Quantized: every channel of a group takes its levels from the group's codebook.
  wq = np.asarray(q.apply(params, q.init(params))["blk"]["kernel"])
  for o in range(8):
    assert set(np.unique(wq[..., o])) <= set(book[o // 4].tolist())


def test_grouped_model_packs_with_one_codebook_a_group_and_runs_bit_for_bit(tmp_path):
  params = _params()
  q = make_quantizer("cluster", bits=3, granularity="group", group_size=4, first_last_bits=4)
  state = q.init(params)
  packed = pack(params, q, state)
  packed.save(tmp_path / "m.packed")
  got = read_packed(tmp_path / "m.packed")
  for path, w in q.kernels(params).items():
    layer = got.layers["/".join(path)]
    g = 1 if path[0] in ("stem", "head") else 4  # the stem and head stay per channel
    k = 2 ** q.layer_bits(path)
    assert layer["group_size"] == g and layer["codebook"].shape == (w.shape[-1] // g, k)
    assert got.codebook("/".join(path)).shape == (w.shape[-1], k)
  model = RepVGG(TINY, num_classes=5, deploy=True)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  want = model.apply({"params": q.apply(params, state)}, x)
  np.testing.assert_array_equal(model.apply(got.to_variables(), x), want)


# Each model a layout a layer (rules by layer path); the stem and head at 3 bits per channel.
_GROUP4 = dict(granularity="group", group_size=4)
LAYOUT_RULES = {
    "scalar": (LayerRule("stages_0_0/.*", **_GROUP4),
               LayerRule("stages_1_0/.*", int8_levels=True, **_GROUP4),
               LayerRule("stages_3_0/.*", granularity="tensor")),  # stages_2_0: per channel
    "vector": (LayerRule("stages_0_0/.*", cluster_dim=2),
               LayerRule("stages_1_0/.*", cluster_dim=4, granularity="tensor"),
               LayerRule("stages_2_0/.*", cluster_dim=2, **_GROUP4)),
}


@pytest.mark.parametrize("kind", sorted(LAYOUT_RULES))
def test_size_accounting_is_the_bytes_of_the_saved_arrays(tmp_path, kind):
  params = _params()
  q = make_quantizer("cluster", bits=2, first_last_bits=3, rules=LAYOUT_RULES[kind])
  packed = pack(params, q, q.init(params))
  packed.save(tmp_path / "m.packed")
  with np.load(tmp_path / "m.packed") as z:
    for path, w in q.kernels(params).items():
      key, spec = "/".join(path), q.layer(path)
      stored = sum(z[f"q/{key}/{part}"].nbytes for part in ("packed", "codebook", "int_scale")
                   if f"q/{key}/{part}" in z.files)
      assert stored == mixed.layer_bytes(w.shape, spec.bits, per_channel=spec.per_channel,
                                         group_size=spec.group_size,
                                         cluster_dim=spec.cluster_dim,
                                         int8_levels=spec.int8_levels), key
  assert_every_rule_matches(LAYOUT_RULES[kind], ["/".join(p) for p in q.kernels(params)])


def test_grouped_int8_levels_run_the_integer_forward(tmp_path):
  params = _params()
  q = make_quantizer("cluster", bits=4, granularity="group", group_size=4, int8_levels=True,
                     first_last_bits=4)
  scales = q.int_scales(params, q.init(params))
  for path, s in scales.items():
    if path[0] not in ("stem", "head"):
      s = np.asarray(s).reshape(-1, 4)
      np.testing.assert_array_equal(s, np.repeat(s[:, :1], 4, axis=1))  # one scale a group
  model = RepVGG(TINY, num_classes=5, deploy=True, act_bits=8)
  state = q.init(params)
  batches = [jnp.asarray(np.random.default_rng(s).standard_normal((8, 32, 32, 3)), jnp.float32)
             for s in range(2)]
  quant = rv.calibrate(model, {"params": q.apply(params, state), "quant": state}, batches)
  desc = rv.model_description(model, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, dataset="test")
  rv.pack(params, q, quant, desc).save(tmp_path / "m.packed")
  deployed = rv.load_packed(tmp_path / "m.packed")
  images = np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  fake, integer = np.asarray(deployed(images)), np.asarray(deployed.integer(images))
  assert np.abs(fake - integer).max() <= 0.05 * np.abs(fake).max()


def test_bad_group_sizes_are_refused_naming_the_field():
  params = _params()
  q = make_quantizer("cluster", bits=2, granularity="group", group_size=5)
  with raises_naming(ValueError, "quant.group_size=5", "16", "stages_0_0/reparam_conv/kernel"):
    q.check_shapes({p: w.shape for p, w in q.kernels(params).items()})
  with pytest.raises(ValueError, match="quant.group_size=5"):
    q.init(params)
  with pytest.raises(ValueError, match="group_size=0"):
    make_quantizer("cluster", granularity="group", group_size=0)
  with raises_naming(ValueError, "group_size=4", "granularity='group'"):
    make_quantizer("cluster", granularity="channel", group_size=4)
  with raises_naming(ValueError, "granularity='group'", "method='uniform'"):
    make_quantizer("uniform", granularity="group", group_size=4)


def test_config_refuses_group_settings_at_start():
  from repvgg_jax.train import config as config_lib
  cfg = config_lib.base_config()
  cfg.quant.group_size = 4
  with raises_naming(ValueError, "quant.group_size=4", "granularity='group'"):
    config_lib.validate(cfg)
  cfg.quant.granularity, cfg.quant.method = "group", "lsq"
  with raises_naming(ValueError, "quant.granularity='group'", "method='lsq'"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("opts", [dict(cluster_dim=2), dict(cluster_dim=2, granularity="group",
                                                            group_size=4)])
def test_vector_model_packs_loads_and_exports(tmp_path, opts):
  params = _params()
  q = make_quantizer("cluster", bits=3, first_last_bits=4, **opts)
  state = q.init(params)
  model = RepVGG(TINY, num_classes=5, deploy=True)
  desc = rv.model_description(model, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, dataset="test")
  rv.pack(params, q, state, desc).save(tmp_path / "m.packed")
  deployed = rv.load_packed(tmp_path / "m.packed")
  for path, w in q.kernels(params).items():
    layer = deployed.packed.layers["/".join(path)]
    d = 1 if path[0] in ("stem", "head") else 2  # the stem has 3 input channels
    assert layer["cluster_dim"] == d
    assert deployed.packed.indices("/".join(path)).shape == (*w.shape[:-2], w.shape[-2] // d,
                                                             w.shape[-1])
  images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  x = rv.deploy.normalize_images(images, (0.5,) * 3, (0.25,) * 3)
  want = np.asarray(model.apply({"params": q.apply(params, state)}, x))
  # The decoded kernels are the QAT forward's, bit for bit; load_packed and StableHLO
  # normalize inside their own programs (float rounding only).
  np.testing.assert_array_equal(model.apply(deployed.packed.to_variables(), x), want)
  np.testing.assert_allclose(np.asarray(deployed(images)), want, rtol=1e-6, atol=1e-6)
  exported = jax.export.deserialize(rv.export_stablehlo(deployed.packed, tmp_path / "m.hlo"))
  np.testing.assert_allclose(np.asarray(exported.call(images)), want, rtol=1e-6, atol=1e-6)


def test_vector_refit_keeps_a_fitted_codebook_and_follows_moved_weights():
  params = _params()
  q = make_quantizer("cluster", bits=2, cluster_dim=2, first_last_bits=4)
  state = q.init(params)
  path = ("stages_1_0", "reparam_conv", "kernel")
  book = lambda st: jnp.asarray(traverse_util.flatten_dict(st)[path])  # noqa: E731
  np.testing.assert_allclose(book(q.refit(params, state)), book(state), atol=1e-5)
  moved = traverse_util.flatten_dict(params)
  moved[path] = moved[path] + 0.3 * np.random.default_rng(0).standard_normal(
      moved[path].shape).astype(np.float32)
  refit = q.refit(traverse_util.unflatten_dict(moved), state)
  err = lambda c: float(jnp.sum(vector_squared_error(moved[path], c, 2)))  # noqa: E731
  assert err(book(refit)) < 0.9 * err(book(state))


def test_bad_cluster_dims_are_refused_naming_the_field():
  params = _params()
  q = make_quantizer("cluster", bits=2, cluster_dim=3)
  with raises_naming(ValueError, "quant.cluster_dim", "=3", "stages_0_0/reparam_conv/kernel",
                     "16"):
    q.check_shapes({p: w.shape for p, w in q.kernels(params).items()})
  with pytest.raises(ValueError, match="cluster_dim=0"):
    make_quantizer("cluster", cluster_dim=0)
  with raises_naming(ValueError, "cluster_dim=2", "method='cluster'"):
    make_quantizer("lsq", cluster_dim=2)
  with raises_naming(ValueError, "cluster_dim=2", "int8_levels=True"):
    make_quantizer("cluster", cluster_dim=2, int8_levels=True)
  from repvgg_jax.train import config as config_lib
  cfg = config_lib.base_config()
  cfg.quant.cluster_dim, cfg.quant.int8_levels = 2, True
  with raises_naming(ValueError, "quant.cluster_dim=2", "int8_levels=True"):
    config_lib.validate(cfg)

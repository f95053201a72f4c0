"""Uniform baselines: post-training quantization (ptq) and the min-max grid."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.quant import export, make_quantizer, ptq, uniform, uniform_codebook
from _util import random_variables

# SE blocks (left float) and dead identity channels (merged-kernel outliers).
TINY_SE = Variant((1, 1, 2, 1), (0.25, 0.25, 0.25, 0.25), se=True)


@functools.lru_cache(maxsize=None)
def _params():
  x = jnp.ones((1, 32, 32, 3))
  v = random_variables(RepVGG(TINY_SE, num_classes=5), x, tiny_var_channels=1)
  merged = jax.device_get(jax.jit(rv.merge)(v)["params"])
  return jax.tree.map(lambda a: np.asarray(a, np.float32), merged)  # float32 deploy params


def _kernels(tree, path=()):
  """(path, kernel) for every kernel ptq quantizes (not SE)."""
  for name, sub in tree.items():
    p = path + (name,)
    if isinstance(sub, dict):
      yield from _kernels(sub, p)
    elif name == "kernel" and "se" not in p:
      yield p, sub


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return np.asarray(tree)


def _step(a, bits):
  return 2 * a if bits == 1 else a / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ptq_per_channel_grid(bits):
  params = _params()
  out = ptq(params, bits=bits, granularity="channel", first_last_bits=None)
  kernels = list(_kernels(params))
  assert {p[0] for p, _ in kernels} >= {"stem", "head"}
  for path, w in kernels:
    w, q = np.asarray(w).reshape(-1, w.shape[-1]), _get(out, path).reshape(-1, w.shape[-1])
    assert q.dtype == np.float32
    a = np.abs(w).max(axis=0)
    np.testing.assert_array_equal(np.abs(q).max(axis=0), a)  # max |w| is a level
    assert max(np.unique(q[:, o]).size for o in range(q.shape[1])) <= 2 ** bits
    err = np.abs(q.astype(np.float64) - w).max(axis=0)
    assert np.all(err <= _step(a.astype(np.float64), bits) / 2 * (1 + 1e-6)), path


@pytest.mark.parametrize("bits", [2, 4])
def test_ptq_per_tensor_grid(bits):
  params = _params()
  out = ptq(params, bits=bits, granularity="tensor", first_last_bits=None)
  for path, w in _kernels(params):
    w, q = np.asarray(w), _get(out, path)
    a = np.abs(w).max()
    assert np.abs(q).max() == a and np.unique(q).size <= 2 ** bits
    assert np.abs(q.astype(np.float64) - w).max() <= _step(float(a), bits) / 2 * (1 + 1e-6), path


def test_ptq_stem_and_head_use_first_last_bits():
  params = _params()
  out = ptq(params, bits=2, granularity="channel", first_last_bits=8)
  at8 = ptq(params, bits=8, granularity="channel", first_last_bits=8)
  for path, _ in _kernels(params):
    if path[0] in ("stem", "head"):
      np.testing.assert_array_equal(_get(out, path), _get(at8, path))
      assert np.unique(_get(out, path)).size > 4
    else:
      q = _get(out, path).reshape(-1, _get(out, path).shape[-1])
      assert max(np.unique(q[:, o]).size for o in range(q.shape[1])) <= 4
  # first_last_bits=None: stem and head at `bits` too.
  body = ptq(params, bits=2, granularity="channel", first_last_bits=None)
  stem = _get(body, ("stem", "reparam_conv", "kernel"))
  assert max(np.unique(stem[..., o]).size for o in range(stem.shape[-1])) <= 4


def test_ptq_leaves_se_and_biases_untouched():
  params = _params()
  out = ptq(params, bits=3)
  chex.assert_trees_all_equal_structs(out, params)
  quantized = {p for p, _ in _kernels(params)}
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert any("se" in [k.key for k in p] for p, _ in leaves)
  for p, v in leaves:
    path = tuple(k.key for k in p)
    if path not in quantized:
      np.testing.assert_array_equal(_get(out, path), np.asarray(v), err_msg="/".join(path))


def test_ptq_equals_uniform_export():
  params = {k: v for k, v in _params().items() if k in ("stem", "stages_0_0", "head")}
  q = make_quantizer("uniform", bits=4, granularity="channel", first_last_bits=8)
  packed = export(params, q, {}).to_variables()["params"]
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, ptq(params, bits=4)), packed)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=0), "bits=0"), (dict(bits=9), "bits=9"), (dict(bits=2.5), "bits=2.5"),
    (dict(first_last_bits=12), "first_last_bits=12"),
    (dict(granularity="row"), "granularity='row'"),
])
def test_ptq_names_bad_values(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    ptq({"layer": {"kernel": np.zeros((3, 3, 2, 2), np.float32)}}, **kwargs)


@pytest.mark.parametrize("per_channel", [False, True])
def test_uniform_codebook_same_in_and_out_of_jit(per_channel):
  assert uniform_codebook is uniform.uniform_codebook
  w = jnp.asarray(np.random.default_rng(0).standard_t(3, (3, 3, 4, 6)), jnp.float32)
  for bits in (1, 2, 4, 8):
    eager = uniform_codebook(w, bits, per_channel)
    jitted = jax.jit(uniform_codebook, static_argnums=(1, 2))(w, bits, per_channel)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    assert np.all(np.diff(np.asarray(eager), axis=-1) >= 0)

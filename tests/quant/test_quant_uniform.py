"""Uniform quantization: integer grids, min-max / MSE steps, LSQ fake-quant and its gradient, ptq."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.quant import make_quantizer, pack, ptq, uniform
from _util import random_variables, tiny_variant

# SE blocks (left float) and dead identity channels (merged-kernel outliers).
TINY_SE = tiny_variant((1, 1, 2, 1), se=True)


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


def _brute_force(x, step, qmin, qmax):
  """Nearest of the levels k * step, k in [qmin, qmax], by exhaustive search (float64)."""
  x, step = np.asarray(x, np.float64), np.asarray(step, np.float64)
  levels = np.arange(qmin, qmax + 1)[:, None] * np.broadcast_to(step, x.shape[-1:])[None]
  d = np.abs(x[..., None, :] - levels)                         # (..., K, C)
  return np.take_along_axis(levels, d.argmin(-2).reshape(-1, x.shape[-1]), 0).reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_grid_has_two_to_the_bits_distinct_signed_levels(bits):
  levels = np.asarray(uniform.grid(jnp.float32(0.5), bits))
  qmin, qmax = uniform.int_range(bits, True)
  assert (qmin, qmax) == (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
  assert np.unique(levels).size == 2 ** bits
  np.testing.assert_array_equal(levels, 0.5 * np.arange(qmin, qmax + 1))
  assert uniform.int_range(bits, False) == (0, 2 ** bits - 1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_is_the_nearest_grid_level(bits, signed):
  rng = np.random.default_rng(bits)
  x = rng.standard_t(3, (64, 5)).astype(np.float32)
  step = rng.uniform(0.05, 0.5, 5).astype(np.float32)
  qmin, qmax = uniform.int_range(bits, signed)
  got = np.asarray(uniform.fake_quant(jnp.asarray(x), jnp.asarray(step), qmin, qmax))
  np.testing.assert_allclose(got, _brute_force(x, step, qmin, qmax), rtol=1e-6, atol=1e-7)


def test_lsq_gradient_matches_its_formula():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 4)) * 2, jnp.float32)
  g = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
  step = jnp.asarray([0.1, 0.3, 0.5, 1.0], jnp.float32)
  qmin, qmax, scale = -8, 7, 0.37
  gx, gs = jax.grad(lambda x, s: jnp.sum(g * uniform.fake_quant(x, s, qmin, qmax, scale)),
                    argnums=(0, 1))(x, step)
  v = np.asarray(x) / np.asarray(step)
  inside = (v >= qmin) & (v <= qmax)
  ds = np.where(inside, np.round(v) - v, np.where(v < qmin, qmin, qmax))
  np.testing.assert_allclose(gx, np.where(inside, g, 0.0))
  np.testing.assert_allclose(gs, scale * np.sum(ds * np.asarray(g), axis=0), rtol=1e-5)
  assert not np.all(inside) and np.any(inside)  # both branches were exercised
  assert uniform.lsq_grad_scale(100, 7) == pytest.approx(1 / np.sqrt(700))


@pytest.mark.parametrize("per_channel", [False, True])
def test_mse_step_is_the_best_candidate_and_beats_minmax_on_heavy_tails(per_channel):
  w = jnp.asarray(np.random.default_rng(1).standard_t(2, (3, 3, 8, 6)), jnp.float32)
  bits = 3
  qmin, qmax = uniform.int_range(bits, True)
  cols = np.asarray(w).reshape(-1, 6) if per_channel else np.asarray(w).reshape(-1, 1)

  def err(step):
    return np.sum((_brute_force(cols, step, qmin, qmax) - cols) ** 2, axis=0)

  best = np.asarray(uniform.mse_step(w, bits, per_channel)).reshape(-1)
  top = np.abs(cols).max(axis=0)
  for frac in uniform.MSE_CANDIDATES[::7]:
    assert np.all(err(best) <= err(frac * top / qmax) * (1 + 1e-5))
  minmax = np.asarray(uniform.minmax_step(w, bits, per_channel)).reshape(-1)
  assert np.sum(err(best)) < np.sum(err(minmax))


@pytest.mark.parametrize("clipping", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ptq_per_channel_grid(bits, clipping):
  params = _params()
  out = ptq(params, bits=bits, granularity="channel", first_last_bits=None, clipping=clipping)
  kernels = list(_kernels(params))
  assert {p[0] for p, _ in kernels} >= {"stem", "head"}
  qmin, qmax = uniform.int_range(bits, True)
  for path, w in kernels:
    w, q = np.asarray(w).reshape(-1, w.shape[-1]), _get(out, path).reshape(-1, w.shape[-1])
    assert q.dtype == np.float32
    step = np.asarray(uniform.minmax_step(w, bits, True) if clipping == "minmax"
                      else uniform.mse_step(w, bits, True))
    np.testing.assert_allclose(q, _brute_force(w, step, qmin, qmax), rtol=1e-6, atol=1e-7)
    if clipping == "minmax":
      np.testing.assert_allclose(np.abs(q).max(axis=0), np.abs(w).max(axis=0), rtol=1e-6)


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


@pytest.mark.parametrize("clipping", ["minmax", "mse"])
def test_ptq_equals_uniform_export(clipping):
  params = {k: v for k, v in _params().items() if k in ("stem", "stages_0_0", "head")}
  q = make_quantizer("uniform", bits=4, granularity="channel", first_last_bits=8,
                     clipping=clipping)
  packed = pack(params, q, q.init(params)).to_variables()["params"]
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, ptq(params, bits=4, clipping=clipping)),
                              packed)


def test_lsq_steps_get_gradients_and_uniform_steps_do_not():
  params = {k: v for k, v in _params().items() if k in ("stem", "stages_0_0", "head")}
  for method, learns in (("lsq", True), ("uniform", False)):
    q = make_quantizer(method, bits=3, clipping="mse")
    state = q.init(params)
    grads = jax.grad(lambda s: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(
        q.apply(params, s))))(state)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert (min(norms) > 0) if learns else (max(norms) == 0), method


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=1), "bits=1"), (dict(bits=9), "bits=9"), (dict(bits=2.5), "bits=2.5"),
    (dict(first_last_bits=12), "first_last_bits=12"),
    (dict(granularity="row"), "granularity='row'"), (dict(clipping="kl"), "clipping='kl'"),
])
def test_ptq_names_bad_values(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    ptq({"layer": {"kernel": np.zeros((3, 3, 2, 2), np.float32)}}, **kwargs)


def test_an_lsq_step_pushed_below_zero_still_gives_a_sorted_grid_and_export():
  params = {k: v for k, v in _params().items() if k in ("stem", "stages_0_0", "head")}
  q = make_quantizer("lsq", bits=3)
  state = jax.tree.map(lambda s: -s, q.init(params))  # as an SGD step through zero would
  packed = pack(params, q, state)                   # validates sorted codebooks
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, q.apply(params, state)),
                              packed.to_variables()["params"])

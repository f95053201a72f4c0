"""Vector codebooks: layout, nearest-centroid assignment, straight-through quantize, k-means fits."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from repvgg_jax.quant.levels import nearest_index
from repvgg_jax.quant.vector import (check_cluster_dim, decode_vectors, fit_vector_codebook,
                                     from_vectors, nearest_vector_index, quantize_vectors,
                                     to_vectors)

from _util import raises_naming, vector_squared_error

# The fits share this kernel shape (and bits, d) so they share compilations.
FIT_SHAPE, FIT_BITS, FIT_D = (3, 3, 8, 16), 4, 2


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _brute_index(w, codebook, d):
  """Nearest centroid of every d-vector in float64, by explicit slicing and a
  loop; the first minimum wins."""
  w, c = np.asarray(w, np.float64), np.asarray(codebook, np.float64)
  cin, cout = w.shape[-2:]
  flat = w.reshape(-1, cin, cout)
  out = np.zeros((flat.shape[0], cin // d, cout), np.int32)
  for p in range(flat.shape[0]):
    for j in range(cin // d):
      for o in range(cout):
        book = c if c.ndim == 2 else c[o]
        out[p, j, o] = np.argmin(np.sum((flat[p, j * d:(j + 1) * d, o] - book) ** 2, axis=-1))
  return out.reshape(*w.shape[:-2], cin // d, cout)


def _sse(x, c):
  """float64 sum of squared distances of vectors ``x`` ``(N, d)`` to their nearest row of ``c``."""
  x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
  return float(np.sum(np.min(np.sum((x[:, None] - c[None]) ** 2, axis=-1), axis=1)))


@pytest.mark.parametrize("shape, d", [((3, 3, 8, 5), 4), ((3, 3, 8, 5), 1), ((12, 7), 3),
                                      ((1, 1, 6, 2), 6)])
def test_vectors_round_trip(shape, d):
  w = _rand(shape)
  v = to_vectors(w, d)
  assert v.shape == (*shape[:-2], shape[-2] // d, shape[-1], d)
  np.testing.assert_array_equal(from_vectors(v, shape), w)
  vn = to_vectors(np.asarray(w), d, xp=np)
  assert isinstance(vn, np.ndarray)
  np.testing.assert_array_equal(from_vectors(vn, shape, xp=np), w)


def test_vector_holds_consecutive_input_channels():
  w = jnp.arange(2 * 3 * 8 * 5, dtype=jnp.float32).reshape(2, 3, 8, 5)
  v = to_vectors(w, 4)
  np.testing.assert_array_equal(v[1, 2, 1, 3], [w[1, 2, c, 3] for c in (4, 5, 6, 7)])
  np.testing.assert_array_equal(to_vectors(w[0, 0], 2)[3, 1], w[0, 0, 6:8, 1])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("d", [2, 4])
def test_nearest_index_matches_brute_force(d, per_channel):
  w = _rand((3, 3, 8, 5))
  c = _rand((5, 16, d) if per_channel else (16, d), seed=1)
  idx = nearest_vector_index(w, c, d)
  assert idx.dtype == jnp.int32 and idx.shape == (3, 3, 8 // d, 5)
  np.testing.assert_array_equal(idx, _brute_index(w, c, d))
  np.testing.assert_array_equal(jax.jit(nearest_vector_index, static_argnums=2)(w, c, d), idx)


@pytest.mark.parametrize("per_channel", [False, True])
def test_exact_ties_go_to_the_lower_index(per_channel):
  # Each vector is exactly equidistant (0.5) from two neighbouring centroids of
  # the square; the last ties 0 and 3.
  book = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
  vecs = jnp.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
  w = vecs.T  # (Cin=2, Cout=4): output channel o holds vector o
  if per_channel:  # row o: the square rotated by o places; the same ties, other indices
    c = jnp.stack([jnp.roll(book, o, axis=0) for o in range(4)])
    want = [[0, 2, 0, 2]]
  else:
    c, want = book, [[0, 1, 2, 0]]
  np.testing.assert_array_equal(_brute_index(w, c, 2), want)
  np.testing.assert_array_equal(nearest_vector_index(w, c, 2), want)


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_is_decoded_nearest_and_straight_through(per_channel):
  d, w = 2, _rand((3, 3, 4, 6))
  c = _rand((6, 8, d) if per_channel else (8, d), seed=1)
  idx = nearest_vector_index(w, c, d)
  q = quantize_vectors(w, c, d)
  np.testing.assert_array_equal(q, decode_vectors(idx, c, w.shape))
  np.testing.assert_array_equal(q, decode_vectors(np.asarray(idx), np.asarray(c), w.shape, xp=np))
  o, k = 5, int(idx[1, 2, 1, 5])
  np.testing.assert_array_equal(q[1, 2, 2:4, o], c[o, k] if per_channel else c[k])
  g = _rand(w.shape, seed=2)
  loss = lambda w, c: jnp.sum(quantize_vectors(w, c, d) * g)
  for grad in (jax.grad(loss, argnums=(0, 1)), jax.jit(jax.grad(loss, argnums=(0, 1)))):
    gw, gc = grad(w, c)
    np.testing.assert_array_equal(gw, g)
    np.testing.assert_array_equal(gc, jnp.zeros_like(c))


@pytest.mark.parametrize("per_channel", [False, True])
def test_cluster_dim_one_matches_scalar_path(per_channel):
  rng = np.random.default_rng(3)
  rows = 6 if per_channel else 1
  c = np.sort(np.stack([rng.choice(np.arange(-32, 32), 8, replace=False) / 16
                        for _ in range(rows)]), axis=-1).astype(np.float32)
  w = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
  # Values on midpoints (exact: the levels are multiples of 1/16): ties to the lower level.
  for o in range(6):
    w[0, 0, :, o] = (c[o % rows, 2:6] + c[o % rows, 3:7]) / 2
  c = c if per_channel else c[0]
  np.testing.assert_array_equal(nearest_vector_index(w, c[..., None], 1), nearest_index(w, c))


def test_fit_recovers_separated_centres():
  rng = np.random.default_rng(4)
  centres = np.stack(np.meshgrid(np.arange(4.0), np.arange(4.0)), -1).reshape(16, 2)
  n = int(np.prod(FIT_SHAPE)) // FIT_D
  labels = rng.permutation(np.arange(n) % 16)
  x = centres[labels] + 0.01 * rng.standard_normal((n, 2))
  w = from_vectors(jnp.asarray(x.reshape(3, 3, 4, 16, 2), jnp.float32), FIT_SHAPE)
  c = np.asarray(fit_vector_codebook(w, FIT_BITS, FIT_D))
  assert c.shape == (16, 2)
  dist = np.linalg.norm(centres[:, None] - c[None], axis=-1)
  assert sorted(np.argmin(dist, axis=1)) == list(range(16))  # one centroid per centre
  assert np.max(np.min(dist, axis=1)) < 0.005


def test_fit_no_worse_than_init_and_sklearn():
  w = _rand(FIT_SHAPE, seed=5)
  x = np.asarray(to_vectors(w, FIT_D)).reshape(-1, FIT_D)
  c0 = np.asarray(fit_vector_codebook(w, FIT_BITS, FIT_D, iters=0))
  c = np.asarray(fit_vector_codebook(w, FIT_BITS, FIT_D))
  assert all((x == row).all(axis=1).any() for row in c0)  # the init draws data vectors
  with threadpool_limits(1):  # OpenMP threads only contend on a small, shared machine
    km = KMeans(2 ** FIT_BITS, n_init=10, random_state=0).fit(x.astype(np.float64))
  assert _sse(x, c) <= _sse(x, c0)
  assert _sse(x, c) <= 1.05 * km.inertia_, (_sse(x, c), km.inertia_)
  np.testing.assert_allclose(vector_squared_error(w, c, FIT_D), _sse(x, c), rtol=1e-5)


def test_fit_rows_are_independent_groups():
  w = _rand((3, 3, 8, 64), seed=6)
  c = fit_vector_codebook(w, FIT_BITS, FIT_D, rows=4)
  assert c.shape == (4, 16, 2)
  for i in range(4):
    alone = fit_vector_codebook(w[..., 16 * i:16 * (i + 1)], FIT_BITS, FIT_D)
    np.testing.assert_allclose(c[i], alone, rtol=1e-5, atol=1e-6)


def test_warm_start_at_optimum_stays_and_init_is_used():
  w = _rand(FIT_SHAPE, seed=5)
  c = fit_vector_codebook(w, FIT_BITS, FIT_D)
  np.testing.assert_allclose(fit_vector_codebook(w, FIT_BITS, FIT_D, init_codebook=c), c,
                             atol=1e-6)
  start = _rand((16, 2), seed=7)
  np.testing.assert_array_equal(
      fit_vector_codebook(w, FIT_BITS, FIT_D, init_codebook=start, iters=0), start)
  far = start.at[5].set(100.0)  # no vector is nearest to it: an empty cluster keeps its centroid
  np.testing.assert_array_equal(
      fit_vector_codebook(w, FIT_BITS, FIT_D, init_codebook=far, iters=5)[5], far[5])


def test_fit_with_fewer_vectors_than_centroids():
  w = _rand((4, 3), seed=8)  # 6 vectors of d=2, K=8
  c = fit_vector_codebook(w, 3, 2)
  assert c.shape == (8, 2) and np.isfinite(c).all()
  assert float(vector_squared_error(w, c, 2)) == 0.0


@pytest.mark.parametrize("call, names", [
    (lambda: check_cluster_dim((3, 3, 8, 5), 3), ["cluster_dim=3"]),
    (lambda: check_cluster_dim((3, 3, 8, 5), 0), ["cluster_dim=0"]),
    (lambda: check_cluster_dim((8,), 2), ["cluster_dim=2", "(8,)"]),
    (lambda: nearest_vector_index(jnp.zeros((3, 3, 8, 5)), jnp.zeros((16, 3)), 2),
     ["codebook", "(16, 3)"]),
    (lambda: nearest_vector_index(jnp.zeros((3, 3, 8, 5)), jnp.zeros((4, 16, 2)), 2),
     ["codebook", "(4, 16, 2)"]),
    (lambda: quantize_vectors(jnp.zeros((3, 3, 8, 5)), jnp.zeros((3, 2)), 2),
     ["codebook", "(3, 2)"]),
    (lambda: decode_vectors(jnp.zeros((3, 3, 3, 5), jnp.int32), jnp.zeros((4, 2)), (3, 3, 8, 5)),
     ["indices", "(3, 3, 3, 5)"]),
    (lambda: from_vectors(jnp.zeros((3, 3, 4, 5, 2)), (3, 3, 8, 6)),
     ["vectors", "(3, 3, 4, 5, 2)"]),
    (lambda: fit_vector_codebook(jnp.zeros(FIT_SHAPE), 4, 2, rows=3), ["rows=3"]),
    (lambda: fit_vector_codebook(jnp.zeros(FIT_SHAPE), 9, 2), ["bits=9"]),
    (lambda: fit_vector_codebook(jnp.zeros(FIT_SHAPE), 4, 3), ["cluster_dim=3"]),
    (lambda: fit_vector_codebook(jnp.zeros(FIT_SHAPE), 4, 2, init_codebook=jnp.zeros((8, 2))),
     ["init_codebook", "(8, 2)"]),
])
def test_bad_values_are_named(call, names):
  with raises_naming(ValueError, *names):
    call()

"""Vector codebooks: ``d`` consecutive input-channel weights share one index.

Kernels are HWIO convs ``(H, W, Cin, Cout)`` or dense ``(in, out)``: the input
channel is axis ``-2``, the output channel the last axis. With cluster dim
``d`` (dividing ``Cin``), the weights ``w[..., j*d:(j+1)*d, o]`` form the
d-vector ``(j, o)`` of its spatial position (:func:`to_vectors`), like
coremltools palettization with ``cluster_dim``. A codebook holds
``K = 2^bits`` centroids of dimension ``d``: ``(K, d)`` for the whole tensor,
or ``(Cout, K, d)``, one row per output channel (grouped codebooks are
expanded to per-channel rows by the caller). The index costs ``bits / d``
bits per weight; ``d = 1`` is the scalar codebook of ``levels.py`` (sorted
levels ``c`` there are ``c[..., None]`` here and give the same indices).

Assignment is to the nearest centroid in squared Euclidean distance, ties to
the lowest index (``argmin`` keeps the first minimum): the rule of
``levels.py``, where a value on a midpoint goes to the lower level.

:func:`fit_vector_codebook` is Lloyd's k-means (``jax.lax.while_loop`` with a
tolerance and an iteration cap), vmapped over codebook rows, from the best
(lowest squared error after Lloyd) of ``N_INITS`` k-means++ inits, or warm
started from a given codebook (the periodic refit during QAT). Unlike 1-D
(``kmeans.py``) there is no sorted-run shortcut: each iteration is a full
``O(N K d)`` assignment.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.quant.kmeans import check_bits

# Lloyd runs from this many k-means++ inits (uniforms drawn from ``seed``); the
# fit with the lowest squared error wins.
N_INITS = 3


def check_cluster_dim(shape: Sequence[int], d: int, what: str = "cluster_dim") -> int:
  """Returns ``d`` if it is an int >= 1 dividing the input channels ``shape[-2]``
  of a kernel (ndim >= 2), else raises ValueError naming ``d`` and the shape."""
  shape = tuple(shape)
  if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
    raise ValueError(f"{what}={d!r}: expected an int >= 1 (kernel of shape {shape})")
  if len(shape) < 2:
    raise ValueError(f"{what}={d!r} needs a kernel with an input-channel axis (-2): got shape {shape}")
  if shape[-2] % d:
    raise ValueError(f"{what}={d!r} does not divide the {shape[-2]} input channels (axis -2) "
                     f"of a kernel of shape {shape}")
  return int(d)


def index_shape(shape: Sequence[int], d: int) -> tuple[int, ...]:
  """``(..., Cin // d, Cout)``: the indices of a kernel of ``shape``, one per d-vector
  along the input channels (axis -2); ``d = 1``: the kernel's own shape."""
  shape = tuple(shape)
  return (*shape[:-2], shape[-2] // d, shape[-1])


def to_vectors(w, d: int, xp: Any = jnp):
  """``(..., Cin, Cout) -> (..., Cin // d, Cout, d)``: vector ``[..., j, o]`` is
  ``w[..., j*d:(j+1)*d, o]``. ``xp=numpy`` for host arrays."""
  shape = tuple(np.shape(w))
  d = check_cluster_dim(shape, d)
  v = xp.reshape(xp.asarray(w), (*shape[:-2], shape[-2] // d, d, shape[-1]))
  return xp.swapaxes(v, -1, -2)


def from_vectors(v, shape: Sequence[int], xp: Any = jnp):
  """Inverse of :func:`to_vectors`: the kernel of ``shape`` from its
  ``(..., Cin // d, Cout, d)`` vectors (``d = v.shape[-1]``)."""
  shape, vshape = tuple(shape), tuple(np.shape(v))
  d = check_cluster_dim(shape, vshape[-1] if vshape else 0, "vector length")
  if vshape != (*index_shape(shape, d), d):
    raise ValueError(f"vectors of shape {vshape} do not tile a kernel of shape {shape}: "
                     f"expected {(*index_shape(shape, d), d)}")
  return xp.reshape(xp.swapaxes(xp.asarray(v), -1, -2), shape)


def _check(shape: tuple[int, ...], cb_shape: tuple[int, ...], d: int) -> int:
  d = check_cluster_dim(shape, d)
  k = cb_shape[-2] if len(cb_shape) in (2, 3) else 0
  bits = int(k).bit_length() - 1
  want = f"(K, {d}) or ({shape[-1]}, K, {d}) with K = 2^bits, bits in 1..8"
  if (len(cb_shape) not in (2, 3) or cb_shape[-1] != d or k < 2 or 2 ** bits != k or bits > 8
      or (len(cb_shape) == 3 and cb_shape[0] != shape[-1])):
    raise ValueError(f"vector codebook of shape {cb_shape} does not fit a kernel of shape "
                     f"{shape} at cluster_dim={d}: expected {want}")
  return bits


def check_vector_codebook(w, codebook, d: int) -> int:
  """Validates a ``(K, d)`` or ``(Cout, K, d)`` codebook against kernel ``w``;
  returns its bit width. Raises ValueError naming the shapes."""
  return _check(tuple(np.shape(w)), tuple(np.shape(codebook)), d)


def _distances(v: jax.Array, codebook: jax.Array) -> jax.Array:
  """``(..., Cin//d, Cout, d)`` vectors against ``(K, d)`` or ``(Cout, K, d)``
  centroids: ``(..., Cin//d, Cout, K)`` squared distances."""
  # Direct sum((v - c)^2), not ||c||^2 - 2 v.c: no cancellation, so equal
  # distances (ties) stay exactly equal and the float32 argmin agrees with a
  # float64 one except on near-ties. XLA fuses the subtract-square into the
  # reduction, so only the (#vectors, K) result is materialized, as for the
  # expansion (compiled temp memory checked on CPU).
  return jnp.sum(jnp.square(v[..., None, :] - codebook.astype(v.dtype)), axis=-1)


def nearest_vector_index(w: jax.Array, codebook: jax.Array, d: int) -> jax.Array:
  """Index of the nearest centroid of every d-vector of ``w`` (int32,
  ``(..., Cin // d, Cout)``); ties go to the lowest index."""
  check_vector_codebook(w, codebook, d)
  return jnp.argmin(_distances(to_vectors(w, d), jnp.asarray(codebook)), axis=-1).astype(jnp.int32)


def decode_vectors(idx, codebook, shape: Sequence[int], xp: Any = jnp):
  """The kernel of ``shape`` from indices ``(..., Cin // d, Cout)``: centroid
  ``codebook[idx]`` (per channel ``codebook[o, idx[..., o]]``) at each vector.
  ``xp=numpy`` decodes host arrays."""
  shape, cb_shape = tuple(shape), tuple(np.shape(codebook))
  d = cb_shape[-1] if len(cb_shape) in (2, 3) else 1
  _check(shape, cb_shape, d)
  if tuple(np.shape(idx)) != index_shape(shape, d):
    raise ValueError(f"indices of shape {np.shape(idx)} do not fit a kernel of shape {shape} "
                     f"at cluster_dim={d}: expected {index_shape(shape, d)}")
  idx, codebook = xp.asarray(idx), xp.asarray(codebook)
  if codebook.ndim == 2:
    return from_vectors(codebook[idx], shape, xp)
  return from_vectors(codebook[xp.arange(shape[-1]), idx], shape, xp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste(w, codebook, d):
  return decode_vectors(nearest_vector_index(w, codebook, d), codebook, w.shape).astype(w.dtype)


def _ste_fwd(w, codebook, d):
  return _ste(w, codebook, d), codebook


def _ste_bwd(d, codebook, g):
  # Codebooks are refitted by k-means, not trained by gradient.
  return g, jnp.zeros_like(codebook)


_ste.defvjp(_ste_fwd, _ste_bwd)


def quantize_vectors(w: jax.Array, codebook: jax.Array, d: int) -> jax.Array:
  """Straight-through vector quantizer. Forward: every d-vector replaced by
  its nearest centroid (same dtype as ``w``). Backward: identity to ``w``,
  zero to the codebook."""
  check_vector_codebook(w, codebook, d)
  return _ste(w, codebook, int(d))


def _row_error(x, c):
  return jnp.sum(jnp.min(_distances(x, c), axis=-1))


def _kmeanspp(x, u):
  """k-means++ (D^2 sampling): ``K = len(u)`` data vectors of ``x`` ``(N, d)``,
  each drawn with probability proportional to its squared distance to the
  nearest one drawn so far, by inverting the CDF at the uniforms ``u`` (drawn
  up front: one random op to compile, not one per draw)."""
  n = x.shape[0]
  first = x[jnp.minimum((u[0] * n).astype(jnp.int32), n - 1)]
  c = jnp.zeros((u.shape[0], x.shape[1]), x.dtype).at[0].set(first)
  dmin = jnp.sum(jnp.square(x - first), axis=-1)

  def body(j, carry):
    c, dmin = carry
    cdf = jnp.cumsum(dmin)
    # side="right": a vector at distance 0 (already drawn) is never drawn again,
    # unless all are (fewer distinct vectors than K, e.g. N < K): then the draw
    # is uniform, with replacement, and the duplicates stay empty clusters.
    i = jnp.where(cdf[-1] > 0, jnp.searchsorted(cdf, u[j] * cdf[-1], side="right"),
                  (u[j] * n).astype(jnp.int32))
    new = x[jnp.minimum(i, n - 1)]
    return c.at[j].set(new), jnp.minimum(dmin, jnp.sum(jnp.square(x - new), axis=-1))

  return jax.lax.fori_loop(1, u.shape[0], body, (c, dmin))[0]


def _lloyd(x, c, iters, tol):
  """Lloyd iterations on ``x`` ``(N, d)`` from centroids ``c`` ``(K, d)`` until
  no centroid moves by more than ``tol`` times the data's widest range, or
  ``iters`` iterations."""
  k = c.shape[0]
  scale = jnp.maximum(jnp.max(jnp.max(x, axis=0) - jnp.min(x, axis=0)), jnp.finfo(x.dtype).tiny)

  def cond(carry):
    i, _, shift = carry
    return (i < iters) & (shift > tol * scale)

  def body(carry):
    i, c, _ = carry
    idx = jnp.argmin(_distances(x, c), axis=-1)
    counts = jnp.bincount(idx, length=k)
    # Plain sums (not centred): a cluster of one vector, or of equal ones, is
    # exactly that vector.
    means = jax.ops.segment_sum(x, idx, k) / jnp.maximum(counts, 1)[:, None].astype(x.dtype)
    new = jnp.where(counts[:, None] > 0, means, c)  # an empty cluster keeps its centroid
    return i + 1, new, jnp.max(jnp.abs(new - c))

  return jax.lax.while_loop(cond, body, (0, c, jnp.asarray(jnp.inf, x.dtype)))[1]


def _fit_row(x, init, u, iters, tol):
  if init is not None:
    return _lloyd(x, init, iters, tol)

  def one(ui):
    c = _lloyd(x, _kmeanspp(x, ui), iters, tol)
    return c, _row_error(x, c)

  # lax.map: the inits run one after the other (one (N, K) distance buffer)
  # from one compiled body.
  fits, errs = jax.lax.map(one, u)
  return fits[jnp.argmin(errs)]


# iters and tol are traced (the loop's bounds): changing them does not recompile.
@functools.partial(jax.jit, static_argnames=("bits", "d", "rows"))
def _fit(w, init_codebook, seed, iters, tol, *, bits, d, rows):
  v = to_vectors(w.astype(jnp.float32), d)
  cout = w.shape[-1]
  # (rows, vectors of the row, d): a row holds its Cout / rows channels' vectors.
  x = v.reshape(-1, rows, cout // rows, d).transpose(1, 0, 2, 3).reshape(rows, -1, d)
  # The same uniforms for every row, so a row's fit equals fitting its channels alone.
  u = jax.random.uniform(jax.random.key(seed), (N_INITS, 2 ** bits))
  fit = functools.partial(_fit_row, u=u, iters=iters, tol=tol)
  if init_codebook is None:
    return jax.vmap(lambda r: fit(r, None))(x)
  return jax.vmap(fit)(x, init_codebook.astype(jnp.float32).reshape(rows, 2 ** bits, d))


def fit_vector_codebook(w: jax.Array, bits: int, d: int, *, rows: int = 1, iters: int = 100,
                        tol: float = 1e-6, init_codebook: jax.Array | None = None,
                        seed: int = 0) -> jax.Array:
  """Fits a k-means vector codebook of ``2^bits`` centroids to the d-vectors of ``w``.

  Args:
    w: kernel ``(..., Cin, Cout)``; ``d`` must divide ``Cin``.
    bits: 1..8.
    d: cluster dim.
    rows: number of codebooks along the output channels, dividing ``Cout``:
      channels ``[i*Cout/rows, (i+1)*Cout/rows)`` share codebook ``i``
      (1: per tensor; ``Cout``: per channel).
    iters: Lloyd iteration cap (0: the best init, unrefined).
    tol: stop once no centroid moves by more than ``tol`` times the widest
      per-coordinate range of the row's vectors.
    init_codebook: warm start of the output's shape; skips the init.
    seed: seeds the k-means++ inits (the same for every row).
  Returns:
    float32 ``(K, d)`` for ``rows == 1``, else ``(rows, K, d)``. Jit-able
    (``bits``, ``d`` and ``rows`` are static).
  """
  bits = check_bits(bits)
  shape = tuple(np.shape(w))
  d = check_cluster_dim(shape, d)
  cout = shape[-1]
  if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1 or cout % rows:
    raise ValueError(f"rows={rows!r}: expected an int >= 1 dividing the {cout} output channels "
                     f"of a kernel of shape {shape}")
  if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
    raise ValueError(f"iters={iters!r}: expected an int >= 0")
  if 0 in shape:
    raise ValueError(f"fit_vector_codebook: empty kernel of shape {shape}")
  want = (2 ** bits, d) if rows == 1 else (int(rows), 2 ** bits, d)
  if init_codebook is not None and tuple(np.shape(init_codebook)) != want:
    raise ValueError(f"init_codebook has shape {tuple(np.shape(init_codebook))}, expected {want} "
                     f"for bits={bits}, cluster_dim={d}, rows={rows} and a kernel of shape {shape}")
  c = _fit(jnp.asarray(w), init_codebook, seed, int(iters), float(tol), bits=bits, d=d,
           rows=int(rows))
  return c[0] if rows == 1 else c

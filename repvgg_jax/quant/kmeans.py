"""1-D k-means codebooks for weight tensors.

A codebook is a sorted vector of ``K = 2^bits`` float32 levels; a weight is
quantized to its nearest level (see ``cluster.py``). Two fits:

* :func:`fit_codebook`: jitted Lloyd iterations (``jax.lax.while_loop`` with a
  tolerance and an iteration cap) from a deterministic init (quantiles of the
  data, or quantiles of the ``p^(1/3)`` density, the asymptotically optimal
  level density for squared error) or from k-means++ (needs a key), or warm
  started from a given codebook. Per tensor, or per output channel (the last
  axis; ``jax.vmap``).
* :func:`optimal_codebook`: the globally optimal 1-D fit. 1-D k-means clusters
  are intervals of the sorted values, so dynamic programming over the sorted
  values finds the exact optimum; tensors with more than ``max_points``
  distinct values are first reduced to a fine histogram (exact sums per bin),
  which is optimal over bin-aligned partitions, then polished by Lloyd on the
  raw values. NumPy, float64, outside jit.

Why Lloyd is cheap here: in 1-D the clusters of a sorted codebook are
contiguous runs of the sorted data, so after one sort each iteration is a
``searchsorted`` of the ``K - 1`` midpoints plus prefix-sum differences:
``O(K log N)`` per iteration instead of ``O(N K)``. That lets Lloyd run to
convergence (hundreds of iterations) and try several inits at the cost of one.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

INITS = ("quantile", "companding", "kmeans++")
# Bins of the density estimate behind the "companding" init.
_DENSITY_BINS = 512


def check_bits(bits: int, what: str = "bits") -> int:
  """Returns ``bits`` if it is an int in 1..8, else raises ValueError naming it."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ValueError(f"{what}={bits!r}: expected an int in 1..8")
  return int(bits)


def _sorted_stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sorted values, their prefix sums (centred on the median to keep the
  float32 sums small) and that centre."""
  xs = jnp.sort(x)
  centre = xs[xs.shape[0] // 2]
  prefix = jnp.concatenate([jnp.zeros((1,), xs.dtype), jnp.cumsum(xs - centre)])
  return xs, prefix, centre


def midpoints(codebook: jax.Array) -> jax.Array:
  """``(K,) -> (K - 1,)`` decision boundaries of a sorted codebook."""
  return (codebook[:-1] + codebook[1:]) * 0.5


def _lloyd_step(xs, prefix, centre, codebook):
  # Cluster k holds the sorted values in (m_{k-1}, m_k]: the same tie rule as
  # cluster.assign (a value on a midpoint goes to the lower level).
  n = xs.shape[0]
  ends = jnp.searchsorted(xs, midpoints(codebook), side="right")
  ends = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends, jnp.full((1,), n, ends.dtype)])
  counts = ends[1:] - ends[:-1]
  sums = prefix[ends[1:]] - prefix[ends[:-1]]
  means = centre + sums / jnp.maximum(counts, 1).astype(xs.dtype)
  # An empty cluster keeps its level: in 1-D it stays between its neighbours'
  # new means, so the codebook stays sorted.
  return jnp.sort(jnp.where(counts > 0, means, codebook))


def _lloyd(xs, prefix, centre, codebook, iters, tol):
  scale = jnp.maximum(xs[-1] - xs[0], jnp.finfo(xs.dtype).tiny)

  def cond(carry):
    i, _, shift = carry
    return (i < iters) & (shift > tol * scale)

  def body(carry):
    i, c, _ = carry
    new = _lloyd_step(xs, prefix, centre, c)
    return i + 1, new, jnp.max(jnp.abs(new - c))

  _, c, _ = jax.lax.while_loop(cond, body, (0, codebook, jnp.asarray(jnp.inf, xs.dtype)))
  return c


def _sse(xs, codebook):
  idx = jnp.searchsorted(midpoints(codebook), xs, side="left")
  return jnp.sum(jnp.square(xs - codebook[idx]))


def _quantile_init(xs, k):
  n = xs.shape[0]
  pos = ((jnp.arange(k) + 0.5) / k * n).astype(jnp.int32)
  return xs[jnp.clip(pos, 0, n - 1)]


def _companding_init(xs, k):
  # Levels at the quantiles of p^(1/3) (Panter-Dite): denser than data
  # quantiles in the tails, where quantile inits under-serve outliers. The
  # density comes from equal-count bins (robust to outliers): a bin of width
  # h holding n/B values has p^(1/3) mass ~ h^(2/3).
  n = xs.shape[0]
  edges = xs[jnp.clip((jnp.arange(_DENSITY_BINS + 1) * n) // _DENSITY_BINS, 0, n - 1)]
  widths = jnp.diff(edges)
  mass = jnp.cumsum(jnp.power(widths, 2.0 / 3.0))
  total = mass[-1]
  mass = jnp.where(total > 0, mass / jnp.maximum(total, jnp.finfo(xs.dtype).tiny),
                   (jnp.arange(_DENSITY_BINS) + 1.0) / _DENSITY_BINS)
  targets = (jnp.arange(k) + 0.5) / k
  b = jnp.clip(jnp.searchsorted(mass, targets), 0, _DENSITY_BINS - 1)
  prev = jnp.where(b > 0, mass[jnp.maximum(b - 1, 0)], 0.0)
  frac = jnp.clip((targets - prev) / jnp.maximum(mass[b] - prev, 1e-12), 0.0, 1.0)
  return jnp.sort(edges[b] + frac * widths[b])


def _kmeanspp_init(xs, k, key):
  # Standard k-means++ seeding (D^2 sampling); levels sorted at the end.
  first = jax.random.choice(key, xs)
  c0 = jnp.full((k,), first)

  def body(i, carry):
    c, key = carry
    key, sub = jax.random.split(key)
    chosen = jnp.arange(k)[None, :] < i
    d2 = jnp.min(jnp.where(chosen, jnp.square(xs[:, None] - c[None, :]), jnp.inf), axis=1)
    p = d2 / jnp.maximum(jnp.sum(d2), jnp.finfo(xs.dtype).tiny)
    nxt = jax.random.choice(sub, xs, p=jnp.where(jnp.sum(d2) > 0, p, 1.0 / xs.shape[0]))
    return c.at[i].set(nxt), key

  c, _ = jax.lax.fori_loop(1, k, body, (c0, key))
  return jnp.sort(c)


def _fit_flat(x, k, inits, iters, tol, key, init_codebook, restarts):
  xs, prefix, centre = _sorted_stats(x.astype(jnp.float32))
  if init_codebook is not None:
    starts = [jnp.sort(init_codebook.astype(jnp.float32))]
  else:
    starts = []
    for name in inits:
      if name == "quantile":
        starts.append(_quantile_init(xs, k))
      elif name == "companding":
        starts.append(_companding_init(xs, k))
      else:
        for sub in jax.random.split(key, restarts):
          starts.append(_kmeanspp_init(xs, k, sub))
  fits = [_lloyd(xs, prefix, centre, c, iters, tol) for c in starts]
  if len(fits) == 1:
    return fits[0]
  errs = jnp.stack([_sse(xs, c) for c in fits])
  return jnp.stack(fits)[jnp.argmin(errs)]


@functools.partial(jax.jit,
                   static_argnames=("bits", "per_channel", "init", "iters", "tol", "restarts"))
def _fit(w, init_codebook, key, *, bits, per_channel, init, iters, tol, restarts):
  k = 2 ** bits
  fit = functools.partial(_fit_flat, k=k, inits=init, iters=iters, tol=tol, key=key,
                          restarts=restarts)
  if not per_channel:
    return fit(w.reshape(-1), init_codebook=init_codebook)
  cols = w.reshape(-1, w.shape[-1]).T  # (Cout, fan_in)
  if init_codebook is None:
    return jax.vmap(lambda c: fit(c, init_codebook=None))(cols)
  return jax.vmap(lambda c, cb: fit(c, init_codebook=cb))(cols, init_codebook)


def fit_codebook(w: jax.Array, bits: int, *, per_channel: bool = False,
                 init: str | Sequence[str] = ("quantile", "companding"),
                 iters: int = 300, tol: float = 1e-6, key: jax.Array | None = None,
                 restarts: int = 10, init_codebook: jax.Array | None = None) -> jax.Array:
  """Fits a sorted k-means codebook of ``2^bits`` levels to ``w``.

  Args:
    w: any weight tensor; with ``per_channel`` the last axis is the output
      channel (HWIO convs, ``(in, out)`` dense kernels).
    bits: 1..8.
    per_channel: one codebook per output channel instead of one per tensor.
    init: an init name from ``INITS`` or a sequence of them; with several,
      Lloyd runs from each and the fit with the lowest squared error wins.
      ``"kmeans++"`` needs ``key`` and seeds ``restarts`` runs.
    iters: Lloyd iteration cap.
    tol: stop once no level moves by more than ``tol * (max(w) - min(w))``.
    key: PRNG key for ``"kmeans++"``.
    init_codebook: warm start (``(K,)`` or ``(Cout, K)``); overrides ``init``.
  Returns:
    float32 codebook ``(2^bits,)``, or ``(Cout, 2^bits)`` per channel, sorted
    along the last axis. Jit-able (``bits``, ``per_channel``, ``init``,
    ``iters`` and ``tol`` are static).
  """
  bits = check_bits(bits)
  names = (init,) if isinstance(init, str) else tuple(init)
  bad = [n for n in names if n not in INITS]
  if not names or bad:
    raise ValueError(f"init={init!r}: expected one or more of {INITS}")
  if "kmeans++" in names and key is None and init_codebook is None:
    raise ValueError("init='kmeans++' needs a PRNG key")
  if key is None:
    key = jax.random.key(0)
  if jnp.size(w) == 0:
    raise ValueError(f"fit_codebook: empty tensor of shape {jnp.shape(w)}")
  if init_codebook is not None:
    want = (w.shape[-1], 2 ** bits) if per_channel else (2 ** bits,)
    if jnp.shape(init_codebook) != want:
      raise ValueError(f"init_codebook has shape {jnp.shape(init_codebook)}, expected {want} "
                       f"for bits={bits} and a kernel of shape {jnp.shape(w)}")
  return _fit(jnp.asarray(w), init_codebook, key, bits=bits, per_channel=per_channel,
              init=names, iters=int(iters), tol=float(tol), restarts=int(restarts))


def codebook_mse(w, codebook) -> float:
  """Mean squared quantization error of ``w`` under a per-tensor ``(K,)`` or
  per-channel ``(Cout, K)`` codebook, in float64."""
  w = np.asarray(w, np.float64)
  c = np.asarray(codebook, np.float64)
  if c.ndim == 1:
    idx = np.searchsorted((c[:-1] + c[1:]) / 2, w, side="left")
    return float(np.mean(np.square(w - c[idx])))
  cols = w.reshape(-1, w.shape[-1])
  err = 0.0
  for o in range(cols.shape[1]):
    idx = np.searchsorted((c[o, :-1] + c[o, 1:]) / 2, cols[:, o], side="left")
    err += float(np.sum(np.square(cols[:, o] - c[o, idx])))
  return err / cols.size


def _weighted_points(x: np.ndarray, max_points: int):
  """Sorted points as (weight, sum, sum of squares) per point: the distinct
  values when there are at most ``max_points``, else equal-width bins."""
  values, counts = np.unique(x, return_counts=True)
  if values.size <= max_points:
    return counts.astype(np.float64), values * counts, values * values * counts
  # Half the edges equal-width, half at quantiles: fine both in the bulk and
  # in outlier tails.
  half = max_points // 2
  edges = np.unique(np.concatenate([np.linspace(x.min(), x.max(), half + 1),
                                    np.quantile(x, np.linspace(0, 1, max_points - half + 1))]))
  max_points = edges.size - 1
  b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max_points - 1)
  w = np.bincount(b, minlength=max_points).astype(np.float64)
  s = np.bincount(b, weights=x, minlength=max_points)
  q = np.bincount(b, weights=x * x, minlength=max_points)
  keep = w > 0
  return w[keep], s[keep], q[keep]


def _optimal_flat(x: np.ndarray, k: int, max_points: int) -> np.ndarray:
  w, s, q = _weighted_points(x, max_points)
  m = w.size
  if m <= k:
    levels = s / w
    return np.concatenate([levels, np.full(k - m, levels[-1])])
  W = np.concatenate([[0.0], np.cumsum(w)])
  S = np.concatenate([[0.0], np.cumsum(s)])
  Q = np.concatenate([[0.0], np.cumsum(q)])

  def cost(i, j):  # squared error of points i..j-1 around their mean
    n = W[j] - W[i]
    with np.errstate(divide="ignore", invalid="ignore"):
      c = (Q[j] - Q[i]) - np.square(S[j] - S[i]) / n
    return np.where(n > 0, np.maximum(c, 0.0), np.inf)

  # D[j]: best cost of the first j points with the current number of levels.
  # One level: D[j] = cost(0, j). Each further level: D'[j] = min_i D[i] + cost(i, j).
  j = np.arange(m + 1)
  d = cost(np.zeros_like(j), j)
  d[0] = 0.0
  back = np.zeros((k, m + 1), np.int64)
  i_grid, j_grid = np.meshgrid(j, j, indexing="ij")  # rows i (split), cols j (end)
  costs = np.where(i_grid < j_grid, cost(i_grid, j_grid), np.inf)
  for level in range(1, k):
    total = d[:, None] + costs
    back[level] = np.argmin(total, axis=0)
    d = total[back[level], j]
    d[0] = 0.0
  # Walk the splits back from the end.
  levels, end = [], m
  for level in range(k - 1, -1, -1):
    start = back[level, end] if level else 0
    levels.append((S[end] - S[start]) / (W[end] - W[start]))
    end = start
  return np.sort(np.asarray(levels))


def optimal_codebook(w, bits: int, *, per_channel: bool = False, max_points: int = 2048,
                     polish_iters: int = 300) -> np.ndarray:
  """Globally optimal 1-D k-means codebook (dynamic programming).

  Exact when each tensor (or channel) has at most ``max_points`` distinct
  values; otherwise optimal over partitions aligned to ``max_points``
  equal-width bins. Either way Lloyd then polishes on the raw values, which
  never increases the error. Cost ``O(K * max_points^2)`` per tensor.

  Args:
    w: weight tensor (last axis = output channel for ``per_channel``).
    bits: 1..8.
  Returns:
    float32 codebook ``(2^bits,)`` or ``(Cout, 2^bits)``, sorted.
  """
  bits = check_bits(bits)
  k = 2 ** bits
  w = np.asarray(w, np.float64)
  if w.size == 0:
    raise ValueError(f"optimal_codebook: empty tensor of shape {w.shape}")
  if per_channel:
    cols = w.reshape(-1, w.shape[-1]).T
    c = np.stack([_optimal_flat(col, k, max_points) for col in cols]).astype(np.float32)
  else:
    c = _optimal_flat(w.ravel(), k, max_points).astype(np.float32)
  if polish_iters:
    polished = np.asarray(fit_codebook(jnp.asarray(w, jnp.float32), bits,
                                       per_channel=per_channel, init_codebook=jnp.asarray(c),
                                       iters=polish_iters))
    # Keep the polish only where it helps in float64 (it can only help up to
    # float32 rounding of the level means).
    if codebook_mse(w, polished) <= codebook_mse(w, c):
      c = polished
  return c

"""1-D k-means codebooks for weight tensors.

A codebook is a sorted vector of ``K = 2^bits`` float32 levels; a weight is
quantized to its nearest level (see ``cluster.py``). Two fits:

* :func:`fit_codebook`: jitted Lloyd iterations (``jax.lax.while_loop`` with a
  tolerance and an iteration cap) from a deterministic init (quantiles of the
  data, or quantiles of the ``p^(1/3)`` density, the asymptotically optimal
  level density for squared error), or warm started from a given codebook. Per tensor, or per output channel (the last
  axis; ``jax.vmap``).
* :func:`optimal_codebook`: the globally optimal 1-D fit. 1-D k-means clusters
  are intervals of the sorted values, so dynamic programming over the sorted
  values finds the exact optimum (float64, jitted, vectorized over output
  channels). Rows with more values than ``max_points`` are first reduced to a
  fine histogram, whose bin-aligned optimum is then refined exactly within a
  band of boundaries around it; Lloyd polishes the result on the raw values.

Why Lloyd is cheap here: in 1-D the clusters of a sorted codebook are
contiguous runs of the sorted data, so after one sort each iteration is a
``searchsorted`` of the ``K - 1`` midpoints plus prefix-sum differences:
``O(K log N)`` per iteration instead of ``O(N K)``. That lets Lloyd run to
convergence (hundreds of iterations) and try two inits at the cost of one.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.quant.levels import midpoints, squared_error

INITS = ("quantile", "companding")
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


_INIT_FNS = {"quantile": _quantile_init, "companding": _companding_init}


def _fit_flat(x, k, inits, iters, tol, init_codebook):
  xs, prefix, centre = _sorted_stats(x.astype(jnp.float32))
  if init_codebook is not None:
    starts = [jnp.sort(init_codebook.astype(jnp.float32))]
  else:
    starts = [_INIT_FNS[name](xs, k) for name in inits]
  fits = [_lloyd(xs, prefix, centre, c, iters, tol) for c in starts]
  if len(fits) == 1:
    return fits[0]
  errs = jnp.stack([squared_error(xs, c) for c in fits])
  return jnp.stack(fits)[jnp.argmin(errs)]


@functools.partial(jax.jit, static_argnames=("bits", "per_channel", "init", "iters", "tol"))
def _fit(w, init_codebook, *, bits, per_channel, init, iters, tol):
  k = 2 ** bits
  fit = functools.partial(_fit_flat, k=k, inits=init, iters=iters, tol=tol)
  if not per_channel:
    return fit(w.reshape(-1), init_codebook=init_codebook)
  cols = w.reshape(-1, w.shape[-1]).T  # (Cout, fan_in)
  if init_codebook is None:
    return jax.vmap(lambda c: fit(c, init_codebook=None))(cols)
  return jax.vmap(lambda c, cb: fit(c, init_codebook=cb))(cols, init_codebook)


def fit_codebook(w: jax.Array, bits: int, *, per_channel: bool = False,
                 init: str | Sequence[str] = ("quantile", "companding"),
                 iters: int = 300, tol: float = 1e-6,
                 init_codebook: jax.Array | None = None) -> jax.Array:
  """Fits a sorted k-means codebook of ``2^bits`` levels to ``w``.

  Args:
    w: any weight tensor; with ``per_channel`` the last axis is the output
      channel (HWIO convs, ``(in, out)`` dense kernels).
    bits: 1..8.
    per_channel: one codebook per output channel instead of one per tensor.
    init: an init name from ``INITS`` or a sequence of them; with several,
      Lloyd runs from each and the fit with the lowest squared error wins.
    iters: Lloyd iteration cap.
    tol: stop once no level moves by more than ``tol * (max(w) - min(w))``.
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
  if jnp.size(w) == 0:
    raise ValueError(f"fit_codebook: empty tensor of shape {jnp.shape(w)}")
  if init_codebook is not None:
    want = (w.shape[-1], 2 ** bits) if per_channel else (2 ** bits,)
    if jnp.shape(init_codebook) != want:
      raise ValueError(f"init_codebook has shape {jnp.shape(init_codebook)}, expected {want} "
                       f"for bits={bits} and a kernel of shape {jnp.shape(w)}")
  return _fit(jnp.asarray(w), init_codebook, bits=bits, per_channel=per_channel,
              init=names, iters=int(iters), tol=float(tol))


def codebook_mse(w, codebook) -> float:
  """Mean squared quantization error of ``w`` under a per-tensor ``(K,)`` or
  per-channel ``(Cout, K)`` codebook, in float64."""
  w = np.asarray(w, np.float64)
  with jax.enable_x64(True):
    sse = squared_error(jnp.asarray(w), jnp.asarray(codebook, jnp.float64))
  return float(np.sum(sse)) / w.size


# ---------------------------------------------------------------------------
# Dynamic programming. Everything below runs in float64 (``jax.enable_x64`` scope) on
# rows of sorted values centred on their median; one row per tensor, or per
# output channel, vectorized over rows in fixed-size chunks.

_BAND_ROUNDS = 8  # rounds of band refinement at most


def _prefix(v):
  return jnp.concatenate([jnp.zeros(v.shape[:-1] + (1,), v.dtype), jnp.cumsum(v, -1)], -1)


def _seg_cost(n, s, q):
  """Squared error of a segment around its mean from its count, sum and sum
  of squares (0 for an empty segment)."""
  return jnp.maximum(q - s * s / jnp.where(n > 0, n, 1), 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _dp_chunk(wt, s, q, *, k):
  """Optimal partition of weighted sorted points ``(C, m)`` into ``k``
  contiguous non-empty runs: ``(C, k + 1)`` boundaries in point indices.

  ``D_l[j] = min_{i < j} D_{l-1}[i] + cost(i, j)``, ``O(k m^2)`` per row;
  only the ``D`` tables are kept, the argmins are recomputed one column per
  level on the way back.
  """
  c, m = wt.shape
  W, S, Q = _prefix(wt), _prefix(s), _prefix(q)
  idx = jnp.arange(m + 1)
  cost = jnp.where(idx[None, :, None] > idx[None, None, :],  # [., j, i]: i < j
                   _seg_cost(W[:, :, None] - W[:, None, :], S[:, :, None] - S[:, None, :],
                             Q[:, :, None] - Q[:, None, :]), jnp.inf)

  def level(d, _):
    return jnp.min(d[:, None, :] + cost, axis=-1).at[:, 0].set(0.0), d

  _, tables = jax.lax.scan(level, _seg_cost(W, S, Q), None, length=k - 1)  # [l - 1] = D_l

  def back(end, d):
    col = jnp.take_along_axis(cost, end[:, None, None], 1)[:, 0]
    start = jnp.argmin(d + col, axis=-1)
    return start, start

  _, starts = jax.lax.scan(back, jnp.full((c,), m), tables[::-1])
  return jnp.concatenate([jnp.zeros((c, 1), starts.dtype), starts[::-1].T,
                          jnp.full((c, 1), m, starts.dtype)], axis=1)


@functools.partial(jax.jit, static_argnames=("offsets",))
def _band_chunk(xs, ends, *, offsets):
  """Optimal partition of sorted rows ``xs`` ``(C, n)`` whose boundary ``l``
  lies at ``ends[:, l] + o`` for some ``o`` in ``offsets`` (empty runs allowed)."""
  c, n = xs.shape
  k = ends.shape[1] - 1
  S, Q = _prefix(xs), _prefix(xs * xs)
  pos = jnp.clip(ends[:, :, None] + jnp.asarray(offsets), 0, n)  # (C, k+1, B)
  pos = pos.at[:, 0].set(0).at[:, k].set(n)
  gather = lambda t: jnp.take_along_axis(t, pos.reshape(c, -1), 1).reshape(pos.shape)
  # Per boundary (leading axis): positions, prefix sums and squares there.
  pts = [jnp.moveaxis(v, 1, 0) for v in (pos, gather(S), gather(Q))]

  def step(d, a, b):  # (C, Ba) costs to reach every a + run (a, b] -> (C, Ba, Bb)
    cost = _seg_cost((b[0][:, None] - a[0][:, :, None]).astype(xs.dtype),
                     b[1][:, None] - a[1][:, :, None], b[2][:, None] - a[2][:, :, None])
    return jnp.where(a[0][:, :, None] <= b[0][:, None], d[:, :, None] + cost, jnp.inf)

  def level(d, ab):
    return jnp.min(step(d, ab[:3], ab[3:]), axis=1), d

  lo, hi = [v[:-1] for v in pts], [v[1:] for v in pts]
  _, tables = jax.lax.scan(level, jnp.zeros((c, pos.shape[-1]), xs.dtype), lo + hi)

  def back(b, da):  # b: the chosen boundary l as (C, 1) position, sum, square
    d, a = da[0], da[1:]
    pick = jnp.argmin(step(d, a, b)[..., 0], axis=1)[:, None]
    chosen = [jnp.take_along_axis(v, pick, 1) for v in a]
    return chosen, chosen[0][:, 0]

  last = [v[-1][:, :1] for v in pts]
  _, picks = jax.lax.scan(back, last, [tables[::-1]] + [v[::-1] for v in lo])
  return jnp.concatenate([picks[::-1].T, jnp.full((c, 1), n, picks.dtype)], axis=1)


def _band_offsets(cluster: int) -> tuple[int, ...]:
  """Boundary moves tried by one band round: every offset up to ``r`` and
  every 4th and 16th up to ``4r`` and ``16r``, ``r = min(16, cluster size)``."""
  base = np.arange(-min(16, cluster), min(16, cluster) + 1)
  return tuple(int(o) for o in np.unique(np.concatenate([base, 4 * base, 16 * base])))


def _chunk_rows(m: int) -> int:
  """Rows per DP call: about 2 MB of float64 costs per call (cache sized)."""
  return max(1, min(16, 2 ** 18 // ((m + 1) * (m + 1))))


def _chunked(fn, arrays, size, **kw):
  """``fn`` over row chunks of ``size`` (the last one padded by repetition),
  so a jitted ``fn`` compiles once per ``size``."""
  rows = arrays[0].shape[0]
  out = []
  for r in range(0, rows, size):
    part = [a[r:r + size] for a in arrays]
    pad = size - part[0].shape[0]
    if pad:
      part = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in part]
    out.append(np.asarray(fn(*part, **kw))[:size - pad])
  return np.concatenate(out)


def _row_bins(xs: np.ndarray, m: int):
  """Sorted rows ``(C, n)`` -> ``m`` weighted points per row (count, sum, sum
  of squares; trailing points may be empty): the common refinement of
  ``m / 2`` equal-count and ``m / 2`` equal-width bins, fine both in the bulk
  and in outlier tails."""
  c, n = xs.shape
  half = m // 2
  ec = (np.arange(n) * half) // n
  lo, hi = xs[:, :1], xs[:, -1:]
  ew = np.clip(((xs - lo) / np.where(hi > lo, hi - lo, 1.0) * half).astype(np.int64), 0, half - 1)
  new = np.zeros((c, n), bool)
  new[:, 1:] = (ec[None, 1:] != ec[None, :-1]) | (ew[:, 1:] != ew[:, :-1])
  ids = (np.cumsum(new, 1) + np.arange(c)[:, None] * m).ravel()
  count = lambda v=None: np.bincount(ids, v, minlength=c * m).reshape(c, m).astype(np.float64)
  return count(), count(xs.ravel()), count((xs * xs).ravel())


def _levels(xs_prefix, ends):
  """Run means from prefix sums ``(C, n + 1)`` and boundaries ``(C, K + 1)``;
  empty runs take the nearest level below (or the lowest level)."""
  cnt = np.diff(ends, axis=1).astype(np.float64)
  s = np.diff(np.take_along_axis(xs_prefix, ends, 1), axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    lv = np.where(cnt > 0, s / cnt, -np.inf)
  lv = np.maximum.accumulate(lv, axis=1)
  first = np.min(np.where(np.isfinite(lv), lv, np.inf), axis=1, keepdims=True)
  return np.where(np.isfinite(lv), lv, first)


def _optimal_rows(rows: np.ndarray, k: int, max_points: int,
                  distinct: bool) -> tuple[np.ndarray, bool]:
  """Optimal (or near-optimal, see :func:`optimal_codebook`) levels ``(C, k)``
  for each row of ``rows`` ``(C, n)`` in float64, and whether they are exact."""
  xs = np.sort(rows, axis=1)
  centre = xs[:, xs.shape[1] // 2][:, None]
  xs = xs - centre
  c, n = xs.shape
  prefix = np.concatenate([np.zeros((c, 1)), np.cumsum(xs, 1)], axis=1)
  if distinct:  # one row: its distinct values, exact while they fit
    values, counts = np.unique(xs, return_counts=True)
    exact = values.size <= max_points
    if exact:
      wt = counts[None].astype(np.float64)
      s, q = values[None] * wt, values[None] ** 2 * wt
  else:
    exact = n <= max_points
    if exact:
      wt, s, q = np.ones_like(xs), xs, xs * xs
  if not exact:
    wt, s, q = _row_bins(xs, max_points)
  with jax.enable_x64(True):
    if wt.shape[1] <= k:  # every point its own level
      ends = np.concatenate([np.arange(wt.shape[1] + 1)[None].repeat(c, 0),
                             np.full((c, k - wt.shape[1]), wt.shape[1])], axis=1)
    else:
      ends = _chunked(_dp_chunk, [wt, s, q], min(c, _chunk_rows(wt.shape[1])), k=k)
    # Point boundaries -> boundaries in the sorted values (points are runs).
    cum = np.concatenate([np.zeros((c, 1)), np.cumsum(wt, 1)], axis=1)
    ends = np.rint(np.take_along_axis(cum, ends, 1)).astype(np.int64)
    if not exact:
      # Histogram-aligned optimum -> exact optimum over the partitions whose
      # boundaries each lie at an offset in `offsets` from the current ones,
      # repeated (never worse) until nothing moves.
      offsets = _band_offsets(-(-n // k))
      todo = np.arange(c)
      for _ in range(_BAND_ROUNDS):
        new = _chunked(_band_chunk, [xs[todo], ends[todo]], min(c, 16), offsets=offsets)
        moved = np.any(new != ends[todo], axis=1)
        ends[todo] = new
        todo = todo[moved]
        if not todo.size:
          break
  return _levels(prefix, ends) + centre, exact


def _row_sse(rows: np.ndarray, books: np.ndarray) -> np.ndarray:
  """Per-row squared error ``(C,)`` of rows ``(C, n)`` under codebooks ``(C, K)``, float64."""
  with jax.enable_x64(True):
    return np.asarray(squared_error(jnp.asarray(rows.T, jnp.float64),
                                    jnp.asarray(books, jnp.float64)))


def optimal_codebook(w, bits: int, *, per_channel: bool = False, max_points: int | None = None,
                     polish_iters: int = 300) -> np.ndarray:
  """Globally optimal 1-D k-means codebook (dynamic programming in float64).

  Exact when each row (the tensor, or with ``per_channel`` each output
  channel) has at most ``max_points`` points: distinct values per tensor
  (default 2048), values per channel (default ``sqrt(2^20 / K)`` within
  256..1024: 724, 512, 362 at 1, 2, 3 bits, 256 from 4 bits; channels are
  vectorized).
  Larger rows are first reduced to ``max_points`` histogram bins; the
  bin-aligned optimum is then refined on the raw values by an exact DP over
  every partition whose boundaries each move by at most ``r`` values, or by a
  multiple of 4 up to ``4r``, or of 16 up to ``16r`` (``r`` = min(16, n / K)),
  repeated until nothing moves: a near-optimal fit, not a provably optimal
  one, which Lloyd then polishes (kept per row where it lowers the error; an
  exact fit is already a Lloyd fixed point). Cost ``O(rows * K *
  max_points^2)`` for the DP plus ``O(rows * K * 81^2)`` per band round.

  Args:
    w: weight tensor (last axis = output channel for ``per_channel``).
    bits: 1..8.
    per_channel: one codebook per output channel.
    max_points: exact-DP size limit per row (see above).
    polish_iters: Lloyd iterations after an inexact DP fit (0: none).
  Returns:
    float32 codebook ``(2^bits,)`` or ``(Cout, 2^bits)``, sorted.
  """
  bits = check_bits(bits)
  k = 2 ** bits
  w = np.asarray(w, np.float64)
  if w.size == 0:
    raise ValueError(f"optimal_codebook: empty tensor of shape {w.shape}")
  if max_points is None:  # per channel: the DP's work K * max_points^2 of the 4-bit case
    max_points = int(np.clip(np.sqrt(2 ** 20 / k), 256, 1024)) if per_channel else 2048
  if max_points < 2:
    raise ValueError(f"max_points={max_points!r}: expected at least 2")
  rows = w.reshape(-1, w.shape[-1]).T if per_channel else w.reshape(1, -1)
  levels, exact = _optimal_rows(rows, k, max_points, not per_channel)
  cands = [np.sort(levels.astype(np.float32), 1)]
  if polish_iters and not exact:
    # Lloyd from the DP levels can only lower the error up to float32
    # rounding; keep it per row where it does.
    start = cands[0] if per_channel else cands[0][0]
    polished = fit_codebook(jnp.asarray(w, jnp.float32), bits, per_channel=per_channel,
                            init_codebook=jnp.asarray(start), iters=polish_iters)
    cands.append(np.asarray(polished).reshape(-1, k))
  errs = np.stack([_row_sse(rows, c) for c in cands])
  best = np.stack(cands)[np.argmin(errs, axis=0), np.arange(rows.shape[0])]
  return best if per_channel else best[0]

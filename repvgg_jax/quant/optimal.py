"""The globally optimal 1-D k-means codebook, by dynamic programming.

1-D k-means clusters are intervals of the sorted values, so dynamic
programming over the sorted values finds the exact optimum (float64, jitted,
vectorized over output channels). Rows with more values than ``max_points``
are first reduced to a fine histogram, whose bin-aligned optimum is then
refined exactly within a band of boundaries around it; Lloyd
(:func:`repvgg_jax.quant.kmeans.fit_codebook`) polishes the result on the raw
values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.quant.kmeans import check_bits, fit_codebook
from repvgg_jax.quant.levels import squared_error

# Everything here runs in float64 (``jax.enable_x64`` scope) on
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


_squared_error = jax.jit(squared_error)  # one fused kernel, not one dispatch per select


def _row_sse(rows: np.ndarray, books: np.ndarray) -> np.ndarray:
  """Per-row squared error ``(C,)`` of rows ``(C, n)`` under codebooks ``(C, K)``, float64."""
  with jax.enable_x64(True):
    return np.asarray(_squared_error(jnp.asarray(rows.T, jnp.float64),
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

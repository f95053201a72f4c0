"""1-D k-means codebooks for weight tensors.

A codebook is a sorted vector of ``K = 2^bits`` float32 levels; a weight is
quantized to its nearest level (see ``levels.py``). Two fits:

* :func:`fit_codebook`: jitted Lloyd iterations (``jax.lax.while_loop`` with a
  tolerance and an iteration cap) from a deterministic init (quantiles of the
  data, or quantiles of the ``p^(1/3)`` density, the asymptotically optimal
  level density for squared error), or warm started from a given codebook. Per
  tensor, or per output channel (the last axis; ``jax.vmap``).
* :func:`repvgg_jax.quant.optimal.optimal_codebook`: the globally optimal 1-D
  fit by dynamic programming (``optimal.py``), polished by this Lloyd.

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

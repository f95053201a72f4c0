"""ClusterQAT and uniform quantizers over deploy-form param pytrees.

``make_quantizer(method, bits, granularity, first_last_bits)`` returns a
:class:`Quantizer` with ``init(params) -> state`` (the ``quant`` collection:
a dict of codebooks mirroring ``params``), ``apply(params, state)`` (every
quantized kernel replaced by ``quantize(kernel, codebook)``, straight-through
gradient) and ``refit(params, state)`` (warm-started Lloyd). Quantized leaves:
every ``kernel`` whose path has no component in ``skip`` (default: SE layers
stay float); paths starting with a name in ``first_last`` use
``first_last_bits``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from repvgg_jax.quant.cluster import assign, check_codebook, decode, quantize
from repvgg_jax.quant.kmeans import check_bits, fit_codebook, optimal_codebook
from repvgg_jax.quant.uniform import ptq, uniform_codebook

METHODS = ("cluster", "uniform")
GRANULARITIES = ("tensor", "channel")


@dataclasses.dataclass(frozen=True)
class Quantizer:
  method: str = "cluster"
  bits: int = 4
  granularity: str = "channel"
  first_last_bits: int | None = 8
  first_last: tuple[str, ...] = ("stem", "head")
  skip: tuple[str, ...] = ("se",)
  mask_outside: bool = False
  iters: int = 300
  refit_iters: int = 20

  def layer_bits(self, path: tuple[str, ...]) -> int:
    if self.first_last_bits is not None and path and path[0] in self.first_last:
      return self.first_last_bits
    return self.bits

  def _quantized(self, path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel" and not set(path) & set(self.skip)

  def _map(self, fn, params, state=None, path=()):
    out = {}
    for name, sub in params.items():
      p = path + (name,)
      if isinstance(sub, Mapping):
        r = self._map(fn, sub, None if state is None else state.get(name, {}), p)
        if r:
          out[name] = r
      elif self._quantized(p):
        out[name] = fn(p, sub, None if state is None else state.get(name))
    return out

  def _per_channel(self) -> bool:
    return self.granularity == "channel"

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """Deploy params -> ``quant`` state: ``{..., "kernel": codebook}`` per
    quantized kernel (``(K,)`` or ``(Cout, K)``; empty for ``uniform``).
    Codebooks come from :func:`optimal_codebook` (DP + Lloyd polish)."""
    if self.method == "uniform":
      return {}
    return self._map(lambda p, w, _: jnp.asarray(optimal_codebook(
        w, self.layer_bits(p), per_channel=self._per_channel(), polish_iters=self.iters)), params)

  def refit(self, params, state):
    """Warm-started Lloyd refit of every codebook (jit-able)."""
    if self.method == "uniform":
      return state
    return self._map(lambda p, w, c: fit_codebook(
        w, self.layer_bits(p), per_channel=self._per_channel(), init_codebook=c,
        iters=self.refit_iters), params, state)

  def codebooks(self, params, state):
    """The codebook of every quantized kernel as used by :meth:`apply`."""
    if self.method == "uniform":
      return self._map(lambda p, w, _: uniform_codebook(w, self.layer_bits(p),
                                                        self._per_channel()), params)
    return state

  def apply(self, params, state):
    """Params with every quantized kernel replaced by its quantized value."""
    books = self.codebooks(params, state)

    def walk(tree, cb, path):
      out = {}
      for name, sub in tree.items():
        p = path + (name,)
        if isinstance(sub, Mapping):
          out[name] = walk(sub, cb.get(name, {}) if cb else {}, p)
        elif self._quantized(p):
          if not cb or name not in cb:
            raise ValueError(f"quant state has no codebook for {'/'.join(p)}")
          out[name] = quantize(sub, cb[name], self.mask_outside)
        else:
          out[name] = sub
      return out

    return walk(params, books, ())


def make_quantizer(method: str, bits: int = 4, granularity: str = "channel",
                   first_last_bits: int | None = 8, **opts: Any) -> Quantizer:
  """Builds a :class:`Quantizer`; bad values raise ValueError naming them."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  check_bits(bits)
  if first_last_bits is not None:
    check_bits(first_last_bits, "first_last_bits")
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
  fields = {f.name for f in dataclasses.fields(Quantizer)} - {"method", "bits", "granularity",
                                                             "first_last_bits"}
  bad = sorted(set(opts) - fields)
  if bad:
    raise ValueError(f"unknown quantizer option(s) {bad}; valid: {sorted(fields)}")
  return Quantizer(method, int(bits), granularity, first_last_bits, **opts)


__all__ = ["Quantizer", "assign", "check_codebook", "decode", "fit_codebook", "make_quantizer",
           "optimal_codebook", "ptq", "quantize", "uniform_codebook"]

from repvgg_jax.quant.export import PackedModel, export, load_packed, pack_bits, unpack_bits  # noqa: E402

__all__ += ["PackedModel", "export", "load_packed", "pack_bits", "unpack_bits"]

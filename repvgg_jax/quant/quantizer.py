"""The weight quantizer of deploy-form params: ClusterQAT, uniform, LSQ.

``make_quantizer(method, bits, granularity, first_last_bits, ...)`` returns a
:class:`Quantizer`:

* ``init(params) -> state``: the weight part of the ``quant`` collection, one
  leaf per quantized kernel at the kernel's path: a codebook ``(K,)`` /
  ``(Cout, K)`` / ``(Cout / group_size, K)`` (``cluster`` per tensor, channel,
  group), or a step ``()`` / ``(Cout,)`` (``uniform`` with ``clipping="mse"``,
  ``lsq``). ``uniform`` with ``clipping="minmax"``
  has no state: its step follows ``max|w|`` at every ``apply``.
* ``apply(params, state)``: params with every quantized kernel replaced by its
  quantized value; the gradient passes straight through to the kernel, and
  for ``lsq`` reaches the step (LSQ).
* ``refit(params, state)``: warm-started Lloyd refit of ``cluster`` codebooks.
* ``indices(params, state)``: what the packed export stores, per kernel the
  level indices and the codebook that ``apply`` used.
* ``int_scales(params, state)``: per kernel the scale of the int8 grid its
  levels lie on (uniform grids always; codebooks with ``int8_levels``).

Quantized leaves: every ``kernel`` whose path has no component in ``skip``
(default: SE layers stay float); paths starting with a name in
``first_last`` use ``first_last_bits``; ``layer_bits_of`` (pairs of a kernel path,
``"stages_2_0/reparam_conv/kernel"``, and its bits: a mixed-precision allocation,
:mod:`repvgg_jax.quant.mixed`) overrides both for the layers it names. Other entries of ``state`` (the
activation steps the deploy model keeps in ``quant``) pass through untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

from repvgg_jax.quant import uniform
from repvgg_jax.quant.cluster import assign, int8_scale, quantize, snap_to_int8
from repvgg_jax.quant.kmeans import check_bits, fit_codebook
from repvgg_jax.quant.optimal import optimal_codebook
from repvgg_jax.quant.vector import (check_cluster_dim, fit_vector_codebook,
                                     nearest_vector_index, quantize_vectors)

METHODS = ("cluster", "uniform", "lsq")
# "group": ``group_size`` consecutive output channels share one codebook (cluster only).
GRANULARITIES = ("tensor", "channel", "group")

Path = tuple[str, ...]


def _flat(tree: Mapping[str, Any] | None) -> dict[Path, Any]:
  return traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


def _tree(flat: Mapping[Path, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat))


def by_group(w: jax.Array, group_size: int) -> jax.Array:
  """``(..., Cout) -> (n * group_size, Cout / group_size)``: column ``i`` holds every
  weight of output channels ``[i * g, (i + 1) * g)``, so a per-channel fit of the
  result is the per-group fit of ``w`` (``g = 1``: the channels themselves)."""
  cout = w.shape[-1]
  g = w.reshape(-1, cout // group_size, group_size)
  return jnp.swapaxes(g, 1, 2).reshape(-1, cout // group_size)


def check_group_size(shape: tuple[int, ...], group_size: int, what: str) -> None:
  """ValueError naming ``what`` unless ``group_size`` divides the output channels."""
  if shape[-1] % group_size:
    raise ValueError(f"quant.group_size={group_size} does not divide the {shape[-1]} output "
                     f"channels of {what} (shape {tuple(shape)})")


@dataclasses.dataclass(frozen=True)
class Quantizer:
  method: str = "cluster"
  bits: int = 4
  granularity: str = "channel"
  first_last_bits: int | None = 8
  group_size: int = 1  # granularity "group": output channels per codebook
  # cluster: d consecutive input-channel weights form one vector of a vector codebook
  # (quant/vector.py): one index of ``bits`` bits per d weights.
  cluster_dim: int = 1
  # uniform: the step from max|w| ("minmax", recomputed at every apply) or the
  # least-squared-error clip ("mse", fixed at init); lsq: how the learned step starts.
  clipping: str = "minmax"
  # cluster: snap every codebook to a per-channel int8 grid (levels = scale x int8),
  # so a layer runs as an int8 x int8 -> int32 conv.
  int8_levels: bool = False
  first_last: tuple[str, ...] = ("stem", "head")
  layer_bits_of: tuple[tuple[str, int], ...] = ()
  skip: tuple[str, ...] = ("se",)
  iters: int = 300
  refit_iters: int = 20

  @property
  def per_channel(self) -> bool:
    """One codebook (or step) per row of output channels: per channel or per group."""
    return self.granularity != "tensor"

  def _first_last(self, path: Path) -> bool:
    return self.first_last_bits is not None and bool(path) and path[0] in self.first_last

  def group_of(self, path: Path) -> int:
    """Output channels of kernel ``path`` sharing a codebook row: ``group_size`` with
    granularity ``"group"``, except for the stem and head at ``first_last_bits`` (per
    channel, as they are kept precise: a head of 10 classes has no groups of 4); else 1."""
    return self.group_size if self.granularity == "group" and not self._first_last(path) else 1

  def dim_of(self, path: Path) -> int:
    """The vector length of kernel ``path``'s codebook: ``cluster_dim``, except for the
    stem and head at ``first_last_bits`` (scalar: the stem has 3 input channels)."""
    return 1 if self._first_last(path) else self.cluster_dim

  def layer_bits(self, path: Path) -> int:
    for name, bits in self.layer_bits_of:
      if name == "/".join(path):
        return bits
    if self._first_last(path):
      return self.first_last_bits
    return self.bits

  def quantized(self, path: Path) -> bool:
    return path[-1] == "kernel" and not set(path) & set(self.skip)

  def check_shapes(self, shapes: Mapping[Path, tuple[int, ...]]) -> None:
    """ValueError naming the field and the first layer whose kernel shape the layout
    does not fit (``group_size`` not dividing its output channels, ``cluster_dim`` its
    input channels)."""
    if self.method == "cluster":
      for p, shape in shapes.items():
        check_group_size(shape, self.group_of(p), "/".join(p))
        check_cluster_dim(shape, self.dim_of(p), f"quant.cluster_dim (layer {'/'.join(p)})")

  def kernels(self, params: Mapping[str, Any]) -> dict[Path, Any]:
    """``{path: kernel}`` of every quantized kernel of ``params``."""
    return {p: w for p, w in _flat(params).items() if self.quantized(p)}

  # -- state -----------------------------------------------------------------

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """Deploy params -> the weight part of the ``quant`` state (see the module doc).
    Codebooks come from :func:`optimal_codebook` (DP + Lloyd polish)."""
    out = {}
    for p, w in self.kernels(params).items():
      bits = self.layer_bits(p)
      if self.method == "cluster":
        self.check_shapes({p: w.shape})
        if self.dim_of(p) > 1:
          out[p] = fit_vector_codebook(w, bits, self.dim_of(p), rows=self._row_count(p, w),
                                       iters=self.iters)
        else:
          out[p] = jnp.asarray(optimal_codebook(by_group(w, self.group_of(p)),
                                                bits, per_channel=self.per_channel,
                                                polish_iters=self.iters))
      elif self.method == "lsq" or self.clipping == "mse":
        out[p] = uniform.mse_step(w, bits, self.per_channel)
      # uniform + minmax: no state.
    return _tree(out)

  def refit(self, params: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """Warm-started Lloyd refit of every ``cluster`` codebook (jit-able)."""
    if self.method != "cluster":
      return state
    flat = _flat(state)
    for p, w in self.kernels(params).items():
      if self.dim_of(p) > 1:
        flat[p] = fit_vector_codebook(w, self.layer_bits(p), self.dim_of(p),
                                      rows=self._row_count(p, w), init_codebook=flat[p],
                                      iters=self.refit_iters)
      else:
        flat[p] = fit_codebook(by_group(w, self.group_of(p)), self.layer_bits(p),
                               per_channel=self.per_channel, init_codebook=flat[p],
                               iters=self.refit_iters)
    return _tree(flat)

  def _row_count(self, p: Path, w: jax.Array) -> int:
    return w.shape[-1] // self.group_of(p) if self.per_channel else 1

  def _leaf(self, state: dict[Path, Any], p: Path) -> Any:
    if p not in state:
      raise ValueError(f"quant state has no {self.method} entry for {'/'.join(p)}")
    return state[p]

  def _step(self, p: Path, w: jax.Array, state: dict[Path, Any]) -> jax.Array:
    """The uniform step of kernel ``p`` (LSQ's is learned, the others are not)."""
    if self.method == "lsq":
      return uniform.learned_step(self._leaf(state, p))
    if self.clipping == "mse":
      return jax.lax.stop_gradient(self._leaf(state, p))
    return jax.lax.stop_gradient(uniform.minmax_step(w, self.layer_bits(p), self.per_channel))

  def _rows(self, p: Path, state: dict[Path, Any]) -> jax.Array:
    """Codebook ``p`` with one row per output channel (group rows repeated)."""
    g = self.group_of(p)
    return jnp.repeat(self._leaf(state, p), g, axis=0) if g > 1 else self._leaf(state, p)

  def _codebook(self, p: Path, w: jax.Array, state: dict[Path, Any]) -> jax.Array:
    if self.method == "cluster":
      c = self._rows(p, state)
      return snap_to_int8(c) if self.int8_levels else c
    return uniform.grid(self._step(p, w, state), self.layer_bits(p))

  def codebooks(self, params, state) -> dict[str, Any]:
    """The codebook of every quantized kernel as used by :meth:`apply` (nested)."""
    flat = _flat(state)
    return _tree({p: self._codebook(p, w, flat) for p, w in self.kernels(params).items()})

  # -- forward ---------------------------------------------------------------

  def apply(self, params: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """Params with every quantized kernel replaced by its quantized value."""
    flat, st = _flat(params), _flat(state)
    for p in self.kernels(params):
      w = flat[p]
      if self.method == "cluster" and self.dim_of(p) > 1:
        flat[p] = quantize_vectors(w, self._codebook(p, w, st), self.dim_of(p))
      elif self.method == "cluster":
        flat[p] = quantize(w, self._codebook(p, w, st))
      else:
        qmin, qmax = uniform.int_range(self.layer_bits(p), True)
        count = w.size // w.shape[-1] if self.per_channel else w.size
        flat[p] = uniform.fake_quant(w, self._step(p, w, st), qmin, qmax,
                                     uniform.lsq_grad_scale(count, qmax))
    return _tree(flat)

  # -- deployment ------------------------------------------------------------

  def indices(self, params, state) -> dict[Path, tuple[jax.Array, jax.Array]]:
    """``{path: (indices int32, codebook)}``: decoding gives exactly the values
    :meth:`apply` computes. The indices have the kernel's shape, or one per vector,
    ``(..., Cin / d, Cout)``, for a vector codebook."""
    st, out = _flat(state), {}
    for p, w in self.kernels(params).items():
      if self.method == "cluster":
        c = self._codebook(p, w, st)
        d = self.dim_of(p)
        out[p] = (nearest_vector_index(w, c, d) if d > 1 else assign(w, c), c)
      else:
        bits = self.layer_bits(p)
        qmin, qmax = uniform.int_range(bits, True)
        step = self._step(p, w, st)
        k = uniform.int_values(w, step, qmin, qmax)
        out[p] = ((k - qmin).astype(jnp.int32), uniform.grid(step, bits))
    return out

  def int_scales(self, params, state) -> dict[Path, jax.Array] | None:
    """``{path: scale}`` (``()`` or ``(Cout,)``) of the int8 grid every
    quantized kernel's levels lie on, or None when they do not (``cluster``
    without ``int8_levels``, or more than 8 bits)."""
    if self.method == "cluster" and not self.int8_levels:
      return None
    st = _flat(state)
    return {p: (int8_scale(self._rows(p, st)) if self.method == "cluster"
                else self._step(p, w, st))
            for p, w in self.kernels(params).items()}


def check_options(method: str, bits: int = 4, granularity: str = "channel",
                  first_last_bits: int | None = 8, **opts: Any) -> None:
  """ValueError unless :func:`make_quantizer` can build a quantizer of these options.

  Bits: 1..8 for ``cluster``, 2..8 for ``uniform`` and ``lsq`` (a signed grid needs a
  zero and both signs). Every message starts with the bad option's name
  (``bits=1: ...``), so a config can prefix its group (``quant.bits=1: ...``)."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  check = check_bits if method == "cluster" else uniform.check_uniform_bits
  check(bits)
  if first_last_bits is not None:
    check(first_last_bits, "first_last_bits")
  for name, b in dict(opts.get("layer_bits_of", ())).items():
    check(b, f"layer_bits_of[{name!r}]")
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
  if granularity == "group" and method != "cluster":
    raise ValueError(f"granularity='group' is for codebooks (method='cluster'), not "
                     f"method={method!r}")
  g = opts.get("group_size", 1)
  if isinstance(g, bool) or not isinstance(g, int) or g < 1 or (
      g > 1 and granularity != "group"):
    raise ValueError(f"group_size={g!r}: expected a positive int, above 1 only with "
                     "granularity='group'")
  d = opts.get("cluster_dim", 1)
  if isinstance(d, bool) or not isinstance(d, int) or d < 1 or (d > 1 and method != "cluster"):
    raise ValueError(f"cluster_dim={d!r}: expected a positive int, above 1 only with "
                     "method='cluster'")
  if d > 1 and opts.get("int8_levels"):
    raise ValueError(f"cluster_dim={d} with int8_levels=True: vector codebooks have no int8 "
                     "grid here (the integer forward needs scalar levels)")
  fields = {f.name for f in dataclasses.fields(Quantizer)} - {"method", "bits", "granularity",
                                                             "first_last_bits"}
  bad = sorted(set(opts) - fields)
  if bad:
    raise ValueError(f"unknown quantizer option(s) {bad}; valid: {sorted(fields)}")
  clipping = opts.get("clipping", "minmax")
  if clipping not in uniform.CLIPPINGS:
    raise ValueError(f"clipping={clipping!r}: expected one of {uniform.CLIPPINGS}")


def make_quantizer(method: str, bits: int = 4, granularity: str = "channel",
                   first_last_bits: int | None = 8, **opts: Any) -> Quantizer:
  """Builds a :class:`Quantizer`; bad values raise ValueError naming them
  (:func:`check_options`)."""
  check_options(method, bits, granularity, first_last_bits, **opts)
  opts = dict(opts)
  if "layer_bits_of" in opts:
    opts["layer_bits_of"] = tuple((name, int(b)) for name, b in
                                  sorted(dict(opts["layer_bits_of"]).items()))
  return Quantizer(method, int(bits), granularity, first_last_bits, **opts)


def ptq(params: Mapping[str, Any], bits: int = 8, granularity: str = "channel",
        first_last_bits: int | None = 8, clipping: str = "minmax") -> dict[str, Any]:
  """Post-training uniform quantization of deploy params (weights only).

  Every kernel the quantizer selects (SE layers skipped; ``stem``/``head`` at
  ``first_last_bits``, or at ``bits`` when it is None) is replaced by its
  level on the signed grid of a min-max or MSE-optimal step, per output
  channel or per tensor; biases and skipped layers are returned unchanged.
  Returns float params (dequantized values). Bad values raise ValueError
  naming them.
  """
  q = make_quantizer("uniform", bits=bits, granularity=granularity,
                     first_last_bits=first_last_bits, clipping=clipping)
  return jax.jit(q.apply)(params, q.init(params))

"""The weight quantizers of deploy-form params: a class per method.

``make_quantizer(method, bits, granularity, first_last_bits, ...)`` returns the
quantizer of ``method`` (:data:`QUANTIZERS`): :class:`CodebookQuantizer` (``"cluster"``:
ClusterQAT, scalar, grouped or vector codebooks), :class:`UniformQuantizer`
(``"uniform"``: min-max or MSE step), :class:`LSQQuantizer` (``"lsq"``: learned step).
Each implements :class:`WeightQuantizer`:

* ``init(params) -> state``: the weight part of the ``quant`` collection, one
  leaf per quantized kernel at the kernel's path: a codebook ``(K,)`` /
  ``(Cout, K)`` / ``(Cout / group_size, K)`` (``cluster`` per tensor, channel,
  group), or a step ``()`` / ``(Cout,)`` (``uniform`` with ``clipping="mse"``,
  ``lsq``). ``uniform`` with ``clipping="minmax"``
  has no state: its step follows ``max|w|`` at every ``apply``.
* ``apply(params, state)``: params with every quantized kernel replaced by its
  quantized value; the gradient passes straight through to the kernel, and
  for ``lsq`` reaches the step (LSQ).
* ``refit(params, state)``: warm-started Lloyd refit of codebooks; the identity
  for the uniform grids.
* ``indices(params, state)``: what the packed export stores, per kernel the
  level indices and the codebook that ``apply`` used.
* ``int_scales(params, state)``: per kernel the scale of the int8 grid its
  levels lie on (uniform grids always; codebooks with ``int8_levels``).
* ``learned_mask(state)``: which state leaves the optimizer trains (LSQ steps,
  activation steps) and which it leaves to the fit (codebooks, MSE steps).

Quantized leaves: every ``kernel`` whose path has no component in ``skip``
(default: SE layers stay float). Per-layer choices are rules
(:mod:`repvgg_jax.quant.rules`), read in this order: ``rules``, then ``layer_bits_of``
(pairs of a kernel path, ``"stages_2_0/reparam_conv/kernel"``, and its bits: a
mixed-precision allocation, :mod:`repvgg_jax.quant.mixed`), then the stem/head rule
(paths starting with a name in ``first_last`` at ``first_last_bits``, per channel,
scalar codebooks). Other entries of ``state`` (the activation steps the deploy model
keeps in ``quant``) pass through untouched.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping, Protocol

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util

from repvgg_jax.quant import uniform
from repvgg_jax.quant.cluster import assign, int8_scale, quantize, snap_to_int8
from repvgg_jax.quant.kmeans import check_bits, fit_codebook
from repvgg_jax.quant.optimal import optimal_codebook
from repvgg_jax.quant.rules import (GRANULARITIES, LayerRule, LayerSpec, check_rules,
                                    first_last_rule, layer_bits_rules, resolve)
from repvgg_jax.quant.vector import (check_cluster_dim, fit_vector_codebook,
                                     nearest_vector_index, quantize_vectors)

METHODS = ("cluster", "uniform", "lsq")
# GRANULARITIES (rules.py): "group": ``group_size`` consecutive output channels share one
# codebook (cluster only).

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


class WeightQuantizer(Protocol):
  """What the QAT loop, the packed export and the budget planner call on a weight
  quantizer (one class per method implements it: :class:`CodebookQuantizer`,
  :class:`UniformQuantizer`, :class:`LSQQuantizer`)."""
  method: ClassVar[str]

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]: ...
  def apply(self, params: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]: ...
  def refit(self, params: Mapping[str, Any], state: Mapping[str, Any]) -> Any: ...
  def indices(self, params, state) -> dict[Path, tuple[jax.Array, jax.Array]]: ...
  def int_scales(self, params, state) -> dict[Path, jax.Array] | None: ...
  def learned_mask(self, state: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Quantizer(abc.ABC):
  """The base of every method: the options, which kernels are quantized, each layer's
  :class:`LayerSpec` from the rules, and the loops over kernels; a subclass says what
  one kernel's state, quantized value, indices and int8 scale are (``_init_leaf``,
  ``_quantize``, ``_index``, ``_int_scale``, ``_codebook``)."""
  method: ClassVar[str] = ""
  # True: the state leaves of quantized kernels are trained by the optimizer (LSQ steps);
  # False: they are fitted (codebooks, MSE steps) and the optimizer leaves them alone.
  learns: ClassVar[bool] = False

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
  # Per-layer choices read before layer_bits_of and the stem/head rule (quant/rules.py).
  rules: tuple[LayerRule, ...] = ()
  skip: tuple[str, ...] = ("se",)
  iters: int = 300
  refit_iters: int = 20

  # -- per-layer choices -------------------------------------------------------

  @property
  def all_rules(self) -> tuple[LayerRule, ...]:
    """``rules``, then ``layer_bits_of`` (exact paths), then the stem/head rule."""
    return (self.rules + layer_bits_rules(self.layer_bits_of)
            + first_last_rule(self.first_last, self.first_last_bits))

  def layer(self, path: Path) -> LayerSpec:
    """The :class:`LayerSpec` of kernel ``path``: the rules over the defaults."""
    return resolve(self.all_rules, tuple(path), bits=self.bits, granularity=self.granularity,
                   group_size=self.group_size, cluster_dim=self.cluster_dim,
                   int8_levels=self.int8_levels)

  @property
  def per_channel(self) -> bool:
    """The default granularity is per channel or per group (a rule may differ)."""
    return self.granularity != "tensor"

  def group_of(self, path: Path) -> int:
    """Output channels of kernel ``path`` sharing a codebook row (1 unless grouped)."""
    return self.layer(path).group_size

  def dim_of(self, path: Path) -> int:
    """The vector length of kernel ``path``'s codebook."""
    return self.layer(path).cluster_dim

  def layer_bits(self, path: Path) -> int:
    return self.layer(path).bits

  def int_grid(self, path: Path) -> bool:
    """Whether kernel ``path``'s levels lie on an int8 grid (:meth:`int_scales`)."""
    return True

  def quantized(self, path: Path) -> bool:
    return path[-1] == "kernel" and not set(path) & set(self.skip)

  def check_shapes(self, shapes: Mapping[Path, tuple[int, ...]]) -> None:
    """ValueError naming the field and the first layer whose kernel shape the layout
    does not fit (``group_size`` not dividing its output channels, ``cluster_dim`` its
    input channels)."""
    for p, shape in shapes.items():
      spec = self.layer(p)
      check_group_size(shape, spec.group_size, "/".join(p))
      check_cluster_dim(shape, spec.cluster_dim, f"quant.cluster_dim (layer {'/'.join(p)})")

  def kernels(self, params: Mapping[str, Any]) -> dict[Path, Any]:
    """``{path: kernel}`` of every quantized kernel of ``params``."""
    return {p: w for p, w in _flat(params).items() if self.quantized(p)}

  def learned_mask(self, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state``'s tree of bools: True where the optimizer trains the leaf (LSQ steps and
    every entry that is not a weight quantizer's, such as activation steps), False where
    it is fitted (codebooks, MSE steps: refitted, never stepped)."""
    return _tree({p: self.learns if self.quantized(p) else True for p in _flat(state)})

  def _leaf(self, state: dict[Path, Any], p: Path) -> Any:
    if p not in state:
      raise ValueError(f"quant state has no {self.method} entry for {'/'.join(p)}")
    return state[p]

  # -- the loops (one per phase) ----------------------------------------------

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """Deploy params -> the weight part of the ``quant`` state (see the module doc)."""
    out = {}
    for p, w in self.kernels(params).items():
      leaf = self._init_leaf(p, w, self.layer(p))
      if leaf is not None:
        out[p] = leaf
    return _tree(out)

  def refit(self, params: Mapping[str, Any], state: Mapping[str, Any]) -> Any:
    """The state refitted to ``params``: the identity where nothing is fitted."""
    return state

  def codebooks(self, params, state) -> dict[str, Any]:
    """The codebook of every quantized kernel as used by :meth:`apply` (nested)."""
    flat = _flat(state)
    return _tree({p: self._codebook(p, w, flat, self.layer(p))
                  for p, w in self.kernels(params).items()})

  def apply(self, params: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """Params with every quantized kernel replaced by its quantized value."""
    flat, st = _flat(params), _flat(state)
    for p in self.kernels(params):
      flat[p] = self._quantize(p, flat[p], st, self.layer(p))
    return _tree(flat)

  def indices(self, params, state) -> dict[Path, tuple[jax.Array, jax.Array]]:
    """``{path: (indices int32, codebook)}``: decoding gives exactly the values
    :meth:`apply` computes. The indices have the kernel's shape, or one per vector,
    ``(..., Cin / d, Cout)``, for a vector codebook."""
    st = _flat(state)
    return {p: self._index(p, w, st, self.layer(p)) for p, w in self.kernels(params).items()}

  def int_scales(self, params, state) -> dict[Path, jax.Array] | None:
    """``{path: scale}`` (``()`` or ``(Cout,)``) of the int8 grid of every quantized
    kernel whose levels lie on one (:meth:`int_grid`), or None when none does."""
    st = _flat(state)
    scales = {p: self._int_scale(p, w, st, self.layer(p))
              for p, w in self.kernels(params).items() if self.int_grid(p)}
    return scales or None

  # -- one kernel (per method) -------------------------------------------------

  @abc.abstractmethod
  def _init_leaf(self, p: Path, w: jax.Array, spec: LayerSpec) -> jax.Array | None:
    """Each method's own (:class:`CodebookQuantizer`, :class:`UniformQuantizer`)."""

  @abc.abstractmethod
  def _codebook(self, p: Path, w: jax.Array, st: dict[Path, Any], spec: LayerSpec):
    """Each method's own (:class:`CodebookQuantizer`, :class:`UniformQuantizer`)."""

  @abc.abstractmethod
  def _quantize(self, p: Path, w: jax.Array, st: dict[Path, Any], spec: LayerSpec):
    """Each method's own (:class:`CodebookQuantizer`, :class:`UniformQuantizer`)."""

  @abc.abstractmethod
  def _index(self, p: Path, w: jax.Array, st: dict[Path, Any], spec: LayerSpec):
    """Each method's own (:class:`CodebookQuantizer`, :class:`UniformQuantizer`)."""

  @abc.abstractmethod
  def _int_scale(self, p: Path, w: jax.Array, st: dict[Path, Any], spec: LayerSpec):
    """Each method's own (:class:`CodebookQuantizer`, :class:`UniformQuantizer`)."""


@dataclasses.dataclass(frozen=True)
class CodebookQuantizer(Quantizer):
  """ClusterQAT (``method="cluster"``): a k-means codebook per tensor, channel or group
  of ``group_size`` channels (``(K,)`` / ``(Cout, K)`` / ``(Cout / group_size, K)``),
  fitted by the optimal DP at init and refitted by warm-started Lloyd; ``cluster_dim``
  > 1: a vector codebook of ``cluster_dim`` input-channel weights. The codebooks are
  fitted state: the optimizer never steps them."""
  method: ClassVar[str] = "cluster"

  def int_grid(self, path: Path) -> bool:
    return self.layer(path).int8_levels

  def _row_count(self, w: jax.Array, spec: LayerSpec) -> int:
    return w.shape[-1] // spec.group_size if spec.per_channel else 1

  def _init_leaf(self, p, w, spec):
    """Codebooks come from :func:`optimal_codebook` (DP + Lloyd polish)."""
    self.check_shapes({p: w.shape})
    if spec.cluster_dim > 1:
      return fit_vector_codebook(w, spec.bits, spec.cluster_dim,
                                 rows=self._row_count(w, spec), iters=self.iters)
    return jnp.asarray(optimal_codebook(by_group(w, spec.group_size), spec.bits,
                                        per_channel=spec.per_channel, polish_iters=self.iters))

  def refit(self, params, state):
    """Warm-started Lloyd refit of every codebook (jit-able)."""
    flat = _flat(state)
    for p, w in self.kernels(params).items():
      spec = self.layer(p)
      if spec.cluster_dim > 1:
        flat[p] = fit_vector_codebook(w, spec.bits, spec.cluster_dim,
                                      rows=self._row_count(w, spec), init_codebook=flat[p],
                                      iters=self.refit_iters)
      else:
        flat[p] = fit_codebook(by_group(w, spec.group_size), spec.bits,
                               per_channel=spec.per_channel, init_codebook=flat[p],
                               iters=self.refit_iters)
    return _tree(flat)

  def _rows(self, p, st, spec):
    """Codebook ``p`` with one row per output channel (group rows repeated)."""
    g = spec.group_size
    return jnp.repeat(self._leaf(st, p), g, axis=0) if g > 1 else self._leaf(st, p)

  def _codebook(self, p, w, st, spec):
    c = self._rows(p, st, spec)
    return snap_to_int8(c) if spec.int8_levels else c

  def _quantize(self, p, w, st, spec):
    if spec.cluster_dim > 1:
      return quantize_vectors(w, self._codebook(p, w, st, spec), spec.cluster_dim)
    return quantize(w, self._codebook(p, w, st, spec))

  def _index(self, p, w, st, spec):
    c, d = self._codebook(p, w, st, spec), spec.cluster_dim
    return (nearest_vector_index(w, c, d) if d > 1 else assign(w, c), c)

  def _int_scale(self, p, w, st, spec):
    return int8_scale(self._rows(p, st, spec))


@dataclasses.dataclass(frozen=True)
class UniformQuantizer(Quantizer):
  """A signed uniform grid (``method="uniform"``) per tensor or channel: the step from
  ``max|w|`` at every apply (``clipping="minmax"``, no state) or the MSE-optimal clip
  fitted at init (``"mse"``, a fitted ``()`` / ``(Cout,)`` step). The gradient passes
  straight through to the kernel, never to the step."""
  method: ClassVar[str] = "uniform"

  def _init_leaf(self, p, w, spec):
    return uniform.mse_step(w, spec.bits, spec.per_channel) if self.clipping == "mse" else None

  def _step(self, p, w, st, spec):
    if self.clipping == "mse":
      return jax.lax.stop_gradient(self._leaf(st, p))
    return jax.lax.stop_gradient(uniform.minmax_step(w, spec.bits, spec.per_channel))

  def _codebook(self, p, w, st, spec):
    return uniform.grid(self._step(p, w, st, spec), spec.bits)

  def _quantize(self, p, w, st, spec):
    qmin, qmax = uniform.int_range(spec.bits, True)
    count = w.size // w.shape[-1] if spec.per_channel else w.size
    return uniform.fake_quant(w, self._step(p, w, st, spec), qmin, qmax,
                              uniform.lsq_grad_scale(count, qmax))

  def _index(self, p, w, st, spec):
    qmin, qmax = uniform.int_range(spec.bits, True)
    step = self._step(p, w, st, spec)
    k = uniform.int_values(w, step, qmin, qmax)
    return ((k - qmin).astype(jnp.int32), uniform.grid(step, spec.bits))

  def _int_scale(self, p, w, st, spec):
    return self._step(p, w, st, spec)


@dataclasses.dataclass(frozen=True)
class LSQQuantizer(UniformQuantizer):
  """LSQ (``method="lsq"``): the uniform grid with a learned step ``()`` / ``(Cout,)``,
  started at the MSE-optimal step; the gradient reaches the step (LSQ's scaled
  gradient), and the optimizer trains it."""
  method: ClassVar[str] = "lsq"
  learns: ClassVar[bool] = True

  def _init_leaf(self, p, w, spec):
    return uniform.mse_step(w, spec.bits, spec.per_channel)

  def _step(self, p, w, st, spec):
    return uniform.learned_step(self._leaf(st, p))


QUANTIZERS: dict[str, type[Quantizer]] = {
    q.method: q for q in (CodebookQuantizer, UniformQuantizer, LSQQuantizer)}


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
  rules = opts.get("rules", ())
  check_rules(rules, check)
  for i, r in enumerate(rules):
    if method != "cluster" and r.granularity == "group":
      raise ValueError(f"rules[{i}].granularity='group' is for codebooks (method='cluster'), "
                       f"not method={method!r}")
    if method != "cluster" and (r.cluster_dim or 1) > 1:
      raise ValueError(f"rules[{i}].cluster_dim={r.cluster_dim!r}: above 1 only with "
                       "method='cluster'")
  fields = {f.name for f in dataclasses.fields(Quantizer)} - {"bits", "granularity",
                                                             "first_last_bits"}
  bad = sorted(set(opts) - fields)
  if bad:
    raise ValueError(f"unknown quantizer option(s) {bad}; valid: {sorted(fields)}")
  clipping = opts.get("clipping", "minmax")
  if clipping not in uniform.CLIPPINGS:
    raise ValueError(f"clipping={clipping!r}: expected one of {uniform.CLIPPINGS}")


def make_quantizer(method: str, bits: int = 4, granularity: str = "channel",
                   first_last_bits: int | None = 8, **opts: Any) -> Quantizer:
  """Builds the quantizer class of ``method`` (:data:`QUANTIZERS`); bad values raise
  ValueError naming them (:func:`check_options`)."""
  check_options(method, bits, granularity, first_last_bits, **opts)
  opts = dict(opts)
  if "layer_bits_of" in opts:
    opts["layer_bits_of"] = tuple((name, int(b)) for name, b in
                                  sorted(dict(opts["layer_bits_of"]).items()))
  if "rules" in opts:
    opts["rules"] = tuple(opts["rules"])
  if "first_last" in opts:
    opts["first_last"] = tuple(opts["first_last"])
  return QUANTIZERS[method](int(bits), granularity, first_last_bits, **opts)


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

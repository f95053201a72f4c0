"""Bits where they matter: per-layer weight bits chosen under a size budget.

The pieces, each usable alone; the trainer's ``quant.budget`` uses them
(``train.qat.plan_budget``, ``train.qat.allocate_bits``; docs/quantization.md):

* :func:`layer_bytes`: what the packed file stores for one kernel at ``b`` bits (bit-packed
  indices, the codebook, the int8-grid scale when there is one): the accounting of
  :meth:`repvgg_jax.quant.PackedModel.report`, so a byte budget is the file's own.
* :func:`loss_sensitivity`: per layer and bit width, the loss increase when that layer
  alone is quantized (the others float), measured on the batches ``loss_fn`` closes over.
* :func:`hessian_sensitivity`: HAWQ-v2's second-order estimate,
  ``tr(H_l) / n_l * ||Q_b(w_l) - w_l||^2``, the trace by Hutchinson's estimator
  (Rademacher probes, ``jax.jvp`` over ``jax.grad``, vectorized over the probes).
* :func:`allocate`: the bits per layer that minimize the summed sensitivity under the
  budget, solved exactly as an integer program (``scipy.optimize.milp``, HiGHS): a
  multiple-choice knapsack, one bit width per layer.

Quantizing a layer "at b bits" is what the given quantizer does with that layer at b
bits (``Quantizer.layer_bits_of``): ClusterQAT's optimal codebook, a uniform or LSQ grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repvgg_jax.quant.packed import index_bytes

DEFAULT_BIT_CHOICES = (1, 2, 3, 4, 6, 8)

Path = tuple[str, ...]


def check_bit_choices(choices: Sequence[int], method: str = "cluster") -> tuple[int, ...]:
  """Sorted distinct bit widths, each valid for ``method`` (1..8 for ``cluster``, 2..8
  for uniform grids); ValueError naming a bad one or an empty set."""
  from repvgg_jax.quant.kmeans import check_bits
  from repvgg_jax.quant.uniform import check_uniform_bits
  check = check_bits if method == "cluster" else check_uniform_bits
  choices = tuple(choices)
  if not choices:
    raise ValueError("bit choices: empty; expected bit widths such as (1, 2, 3, 4, 6, 8)")
  return tuple(sorted({check(b, f"bit choice {b!r}") for b in choices}))


def budget_problems(avg_bits: float, total_bytes: int, bit_choices: Sequence[int],
                    method: str, sensitivity: str | None = None,
                    batches: int | None = None) -> list[str]:
  """What is wrong with a budget's own settings, one line each naming the field (whether
  a model can meet the budget is :func:`plan_budget`'s, once its shapes are known);
  ``sensitivity`` and ``batches`` are checked when given."""
  problems = []
  if bool(avg_bits) == bool(total_bytes):
    problems.append(f"avg_bits={avg_bits!r} and bytes={total_bytes!r}: give one budget")
  if avg_bits and not 1 <= avg_bits <= 8:
    problems.append(f"avg_bits={avg_bits!r} must be in 1..8")
  if total_bytes and not (isinstance(total_bytes, int) and total_bytes > 0):
    problems.append(f"bytes={total_bytes!r} must be a positive int")
  try:
    check_bit_choices(bit_choices, method)
  except (ValueError, TypeError) as e:
    problems.append(f"bit_choices={tuple(bit_choices)!r}: {e}")
  if sensitivity is not None and sensitivity not in SENSITIVITIES:
    problems.append(f"sensitivity={sensitivity!r} not in {list(SENSITIVITIES)}")
  if batches is not None and not (isinstance(batches, int) and batches > 0):
    problems.append(f"batches={batches!r} must be a positive int")
  return problems


def layer_bytes(shape: Sequence[int], bits: int, *, per_channel: bool = True,
                group_size: int = 1, cluster_dim: int = 1, int8_levels: bool = False) -> int:
  """Bytes the packed file stores for a kernel of ``shape`` (output channels last) at
  ``bits``: indices bit-packed (``ceil(n / cluster_dim * bits / 8)``: one per
  ``cluster_dim``-vector), float32 codebooks of ``2^bits`` levels or vectors (one per
  ``group_size`` output channels, or one), and a float32 scale per codebook when the
  levels lie on an int8 grid."""
  n, rows = math.prod(shape), (shape[-1] // group_size if per_channel else 1)
  return (index_bytes(-(-n // cluster_dim), bits) + 4 * rows * 2 ** bits * cluster_dim
          + (4 * rows if int8_levels else 0))


def _flat(tree) -> dict[Path, Any]:
  return traverse_util.flatten_dict(dict(tree))


def _set(params, path: Path, value):
  flat = _flat(params)
  flat[path] = value
  return traverse_util.unflatten_dict(flat)


def quantized_kernel(quantizer, path: Path, w, bits: int):
  """Kernel ``w`` at ``path`` as ``quantizer`` quantizes it at ``bits``."""
  q = dataclasses.replace(quantizer, layer_bits_of=(("/".join(path), int(bits)),))
  one = traverse_util.unflatten_dict({path: jnp.asarray(w)})
  return _flat(q.apply(one, q.init(one)))[path]


def loss_sensitivity(loss_fn: Callable[[Any], jax.Array], params, quantizer,
                     bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
                     layers: Sequence[Path] | None = None) -> dict[Path, dict[int, float]]:
  """``{layer: {bits: loss(that layer at bits, others float) - loss(float)}}`` for every
  quantized kernel of ``quantizer`` in ``params`` (or ``layers``). ``loss_fn(params)``
  is jitted once; it closes over the batches it measures on."""
  f = jax.jit(loss_fn)
  base = float(f(params))
  flat = _flat(params)
  layers = list(quantizer.kernels(params)) if layers is None else [tuple(p) for p in layers]
  return {p: {b: float(f(_set(params, p, quantized_kernel(quantizer, p, flat[p], b)))) - base
              for b in bit_choices}
          for p in layers}


def hutchinson_trace(f: Callable[[jax.Array], jax.Array], w: jax.Array, key: jax.Array,
                     samples: int = 64) -> jax.Array:
  """Hutchinson's estimate of ``tr(d^2 f / dw^2)``: the mean of ``v . H v`` over
  ``samples`` Rademacher probes ``v``, ``H v`` by forward-over-reverse
  (``jax.jvp`` of ``jax.grad``), the probes vectorized."""
  grad = jax.grad(f)

  def probe(k):
    v = jax.random.rademacher(k, w.shape, w.dtype)
    return jnp.vdot(v, jax.jvp(grad, (w,), (v,))[1])
  return jnp.mean(jax.vmap(probe)(jax.random.split(key, samples)))


def hessian_sensitivity(loss_fn: Callable[[Any], jax.Array], params, quantizer,
                        bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
                        layers: Sequence[Path] | None = None, *, samples: int = 64,
                        seed: int = 0) -> dict[Path, dict[int, float]]:
  """``{layer: {bits: tr(H) / n * ||Q_bits(w) - w||^2}}`` (HAWQ-v2), ``tr(H)`` of the
  loss with respect to that layer's kernel by :func:`hutchinson_trace`."""
  flat = _flat(params)
  layers = list(quantizer.kernels(params)) if layers is None else [tuple(p) for p in layers]
  key = jax.random.key(seed)
  out = {}
  for i, p in enumerate(layers):
    w = jnp.asarray(flat[p])
    trace = jax.jit(lambda w, k, p=p: hutchinson_trace(
        lambda x: loss_fn(_set(params, p, x)), w, k, samples))(w, jax.random.fold_in(key, i))
    out[p] = {b: float(trace) / w.size * float(jnp.sum(jnp.square(
        quantized_kernel(quantizer, p, w, b) - w))) for b in bit_choices}
  return out


# quant.budget.sensitivity: the name of each measure.
SENSITIVITIES = {"loss": loss_sensitivity, "hessian": hessian_sensitivity}


def allocate(costs: Mapping[Any, Mapping[int, float]], sizes: Mapping[Any, Mapping[int, float]],
             budget: float) -> dict[Any, int]:
  """The bits per layer minimizing ``sum costs[layer][bits]`` subject to
  ``sum sizes[layer][bits] <= budget``, one choice per layer (``costs`` and ``sizes``:
  the same layers and bit widths). Exact: a 0-1 integer program solved by HiGHS
  (``scipy.optimize.milp``). A budget below the smallest achievable size is a
  ValueError naming that size."""
  from scipy.optimize import Bounds, LinearConstraint, milp
  layers = list(costs)
  if set(layers) != set(sizes):
    raise ValueError(f"allocate: costs and sizes name different layers "
                     f"({sorted(map(str, set(layers) ^ set(sizes)))})")
  choices = [(layer, b) for layer in layers for b in sorted(costs[layer])]
  for layer, b in choices:
    if b not in sizes[layer]:
      raise ValueError(f"allocate: no size for {layer} at {b} bits")
  smallest = sum(min(sizes[layer][b] for b in costs[layer]) for layer in layers)
  if budget < smallest:
    raise ValueError(f"budget {budget:,.0f} is below the smallest achievable size "
                     f"{smallest:,.0f} (every layer at its fewest bits)")
  c = np.array([costs[layer][b] for layer, b in choices], np.float64)
  size = np.array([sizes[layer][b] for layer, b in choices], np.float64)
  one_each = np.array([[layer == l2 for l2, _ in choices] for layer in layers], np.float64)
  # Costs shifted to >= 0 per layer (the same optimum): HiGHS's tolerances are relative.
  c -= np.repeat([min(costs[layer].values()) for layer in layers],
                 [len(costs[layer]) for layer in layers])
  res = milp(c, integrality=np.ones_like(c), bounds=Bounds(0, 1),
             constraints=[LinearConstraint(one_each, 1, 1),
                          LinearConstraint(size[None], -np.inf, budget)])
  if not res.success:
    raise RuntimeError(f"allocate: the integer program was not solved ({res.message})")
  picked = res.x > 0.5
  return {layer: b for (layer, b), on in zip(choices, picked) if on}


def allocate_measured(costs: Mapping[Any, Mapping[int, float]],
                      sizes: Mapping[Any, Mapping[int, float]], budget: float) -> dict[Any, int]:
  """:func:`allocate` for *measured* costs (a few batches): a layer is never believed to
  lose less at fewer bits (a measured loss that falls with the bits is noise: each cost
  becomes the largest measured at that many bits or more), and budget the exact solution
  leaves over raises layers, the largest believed gain per byte first, while it fits
  (without this, a tie between 1 and 2 bits could leave half the budget unspent)."""
  believed = {}
  for layer, c in costs.items():
    believed[layer], worst = {}, -np.inf
    for b in sorted(c, reverse=True):
      worst = max(worst, c[b])
      believed[layer][b] = worst
  bits = allocate(believed, sizes, budget)
  left = budget - sum(sizes[layer][b] for layer, b in bits.items())
  while True:
    raises = [((believed[l][bits[l]] - believed[l][b]) / max(sizes[l][b] - sizes[l][bits[l]], 1),
               l, b) for l in bits for b in believed[l]
              if b > bits[l] and sizes[l][b] - sizes[l][bits[l]] <= left]
    if not raises:
      return bits
    _, layer, b = max(raises, key=lambda r: (r[0], -sizes[r[1]][r[2]]))
    left -= sizes[layer][b] - sizes[layer][bits[layer]]
    bits[layer] = b


@dataclasses.dataclass(frozen=True)
class Budget:
  """What :func:`allocate` is given for a model: the layers whose bits it chooses
  (``free``: every quantized kernel no quantizer rule gives bits to; the stem and head
  keep ``first_last_bits``), their packed bytes at each bit choice, and the bytes left for
  them under the budget."""
  free: tuple[Path, ...]
  sizes: dict[Path, dict[int, int]]
  budget: float
  fixed_bytes: int

  def total(self, bits_of: Mapping[Path, int]) -> int:
    """Packed bytes of every quantized kernel with the free layers at ``bits_of``."""
    return self.fixed_bytes + sum(self.sizes[p][bits_of[p]] for p in self.free)


def plan_budget(kernel_shapes: Mapping[Path, Sequence[int]], quantizer, *,
                avg_bits: float = 0.0, total_bytes: int = 0,
                bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES) -> Budget:
  """The :class:`Budget` of the kernels ``kernel_shapes`` (the quantized ones of the
  merged network) under one of two budgets:

  * ``total_bytes``: the packed bytes of every quantized kernel (indices, codebooks,
    scales: :func:`layer_bytes`), the stem and head included at their bits;
  * ``avg_bits``: the free layers get at most the bytes they take all at ``avg_bits``
    uniformly, interpolated between the integer widths around it (``avg_bits=2``:
    exactly a uniform 2-bit model's bytes, so the two compare at equal size).

  ValueError naming the budget and the smallest achievable size when it cannot be met."""
  problems = budget_problems(avg_bits, total_bytes, bit_choices, quantizer.method)
  if problems:
    raise ValueError("; ".join(problems))
  choices = check_bit_choices(bit_choices, quantizer.method)
  spec = {p: quantizer.layer(p) for p in kernel_shapes}

  def size(p: Path, bits: int) -> int:
    return layer_bytes(kernel_shapes[p], bits, per_channel=spec[p].per_channel,
                       group_size=spec[p].group_size, cluster_dim=spec[p].cluster_dim,
                       int8_levels=quantizer.int_grid(p))

  # A layer whose bits a rule sets (the stem and head) keeps them; the others are free.
  fixed = tuple(p for p in kernel_shapes if spec[p].pinned)
  free = tuple(p for p in kernel_shapes if p not in fixed)
  if not free:
    raise ValueError("no layer to allocate bits to (every quantized kernel is a stem or head)")
  sizes = {p: {b: size(p, b) for b in choices} for p in free}
  fixed_bytes = sum(size(p, spec[p].bits) for p in fixed)
  smallest = sum(min(s.values()) for s in sizes.values())
  if total_bytes > 0:
    budget, what = total_bytes - fixed_bytes, f"bytes={total_bytes:,}"
    floor = smallest + fixed_bytes
  else:
    lo, hi = math.floor(avg_bits), math.ceil(avg_bits)
    at = lambda b: sum(size(p, b) for p in free)  # noqa: E731
    budget = at(lo) + (avg_bits - lo) * (at(hi) - at(lo))
    what, floor = f"avg_bits={avg_bits!r} ({budget:,.0f} bytes of the block layers)", smallest
  if budget < smallest:
    raise ValueError(f"{what} is below the smallest achievable size {floor:,} (every block "
                     f"layer at {choices[0]} bits)")
  return Budget(free, sizes, float(budget), fixed_bytes)

"""Mixed precision: size accounting against the packed file, the knapsack against brute
force, Hutchinson against the exact Hessian trace, the per-layer loss sensitivity."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.quant import mixed
from repvgg_jax.models.repvgg import RepVGG
from _util import raises_naming, random_variables, tiny_variant

TINY = tiny_variant((1, 1, 1, 1))


@pytest.fixture(scope="module")
def merged():
  x = jnp.zeros((1, 16, 16, 3))
  v = random_variables(RepVGG(TINY, num_classes=4, cifar_stem=True), x)
  return jax.device_get(rv.merge(v)["params"])


def _loss_fn(merged):
  model = RepVGG(TINY, num_classes=4, deploy=True, cifar_stem=True)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 16, 16, 3)), jnp.float32)
  # Labels: the float network's own predictions, so quantizing can only move away.
  y = jnp.argmax(model.apply({"params": merged}, x), -1)

  def loss(params):
    logits = model.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
  return loss


@pytest.mark.parametrize("opts", [{}, {"granularity": "tensor"}, {"int8_levels": True}],
                         ids=["channel", "tensor", "int8_grid"])
def test_layer_bytes_is_the_packed_files_accounting(merged, opts):
  bits_of = {"stages_0_0/reparam_conv/kernel": 1, "stages_1_0/reparam_conv/kernel": 6,
             "stages_2_0/reparam_conv/kernel": 3}
  q = rv.make_quantizer("cluster", bits=2, layer_bits_of=bits_of, **opts)
  packed = rv.pack(merged, q, q.init(merged))
  rows = {r["path"]: r for r in packed.report()}
  for path, layer in packed.layers.items():
    assert layer["bits"] == bits_of.get(path, 8 if path.startswith(("stem", "head")) else 2)
    assert rows[path]["packed_bytes"] == mixed.layer_bytes(
        layer["shape"], layer["bits"], per_channel=opts.get("granularity") != "tensor",
        int8_levels=opts.get("int8_levels", False)), path


@pytest.mark.parametrize("seed", range(6))
def test_allocate_finds_the_brute_force_optimum(seed):
  rng = np.random.default_rng(seed)
  layers, bits = [f"l{i}" for i in range(5)], (1, 2, 4, 8)
  sizes = {l: {b: float(b * rng.integers(10, 100)) for b in bits} for l in layers}
  # Sensitivities fall with bits, as they do (not required by the solver).
  costs = {l: dict(zip(bits, np.sort(rng.exponential(1.0, len(bits)))[::-1])) for l in layers}
  lo = sum(min(s.values()) for s in sizes.values())
  hi = sum(max(s.values()) for s in sizes.values())
  for budget in np.linspace(lo, hi, 5):
    got = mixed.allocate(costs, sizes, budget)
    assert sum(sizes[l][b] for l, b in got.items()) <= budget + 1e-9
    best = min(sum(costs[l][b] for l, b in zip(layers, pick))
               for pick in itertools.product(bits, repeat=len(layers))
               if sum(sizes[l][b] for l, b in zip(layers, pick)) <= budget + 1e-9)
    assert sum(costs[l][b] for l, b in got.items()) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_measured_costs_that_fall_with_the_bits_do_not_leave_the_budget_unspent():
  # A barely trained network: its few-batch losses say fewer bits lose less (noise).
  # allocate takes them at their word and spends half the budget; allocate_measured
  # believes no layer is better off at fewer bits and spends it.
  sizes = {l: {1: 10.0, 2: 20.0, 4: 40.0} for l in "abc"}
  noisy = {l: {1: 0.0, 2: 0.01, 4: 0.02} for l in "ab"}
  two = {l: sizes[l] for l in "ab"}
  assert mixed.allocate(noisy, two, 40) == {"a": 1, "b": 1}
  assert mixed.allocate_measured(noisy, two, 40) == {"a": 2, "b": 2}
  # With budget left over after the exact solution, ties are raised while they fit.
  flat = {l: {1: 0.1, 2: 0.1, 4: 0.1} for l in "ab"}
  assert mixed.allocate_measured(flat, two, 60) in (
      {"a": 4, "b": 2}, {"a": 2, "b": 4})
  # Costs that fall with the bits, as a trained network's: the exact optimum unchanged.
  for seed in range(4):
    rng = np.random.default_rng(seed)
    mono = {l: dict(zip((1, 2, 4), np.sort(rng.exponential(1.0, 3))[::-1])) for l in "abc"}
    for budget in (30, 50, 70, 120):
      assert mixed.allocate_measured(mono, sizes, budget) == mixed.allocate(mono, sizes, budget)


def test_a_budget_below_the_smallest_size_names_it():
  sizes = {"a": {1: 10.0, 2: 20.0}, "b": {1: 5.0, 2: 9.0}}
  costs = {"a": {1: 1.0, 2: 0.5}, "b": {1: 1.0, 2: 0.2}}
  with raises_naming(ValueError, "budget", "14", "15"):
    mixed.allocate(costs, sizes, 14)
  assert mixed.allocate(costs, sizes, 15) == {"a": 1, "b": 1}
  assert mixed.allocate(costs, sizes, 19) == {"a": 1, "b": 2}


def test_bad_bit_choices_are_named():
  with pytest.raises(ValueError, match="bit choice 9"):
    mixed.check_bit_choices((2, 9))
  with pytest.raises(ValueError, match="bit choice 1"):
    mixed.check_bit_choices((1, 2), method="uniform")
  with pytest.raises(ValueError, match="empty"):
    mixed.check_bit_choices(())
  with pytest.raises(ValueError, match=r"layer_bits_of\['stem/kernel'\]=0"):
    rv.make_quantizer("cluster", layer_bits_of={"stem/kernel": 0})
  assert mixed.check_bit_choices((4, 2, 2)) == (2, 4)


def test_hutchinson_trace_matches_the_exact_hessian_trace():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16))
  w = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)

  def f(w):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x @ w), y[:, None], 1))
  exact = float(jnp.trace(jax.hessian(lambda v: f(v.reshape(6, 3)))(w.ravel())))
  got = float(mixed.hutchinson_trace(f, w, jax.random.key(0), samples=4096))
  assert exact > 0 and got == pytest.approx(exact, rel=0.05), (got, exact)


def test_loss_sensitivity_is_the_loss_with_that_layer_alone_quantized(merged):
  loss = _loss_fn(merged)
  q = rv.make_quantizer("cluster", bits=4)
  table = mixed.loss_sensitivity(loss, merged, q, bit_choices=(1, 8))
  assert set(table) == set(q.kernels(merged))
  path = ("stages_1_0", "reparam_conv", "kernel")
  q1 = rv.make_quantizer("cluster", bits=4, layer_bits_of={"/".join(path): 1})
  only = q1.apply(merged, q1.init(merged))
  params = jax.tree_util.tree_map(lambda a: a, merged)
  params["stages_1_0"]["reparam_conv"]["kernel"] = only["stages_1_0"]["reparam_conv"]["kernel"]
  assert table[path][1] == pytest.approx(float(loss(params)) - float(loss(merged)), abs=1e-6)
  # One bit moves the loss more than eight on every layer.
  assert all(abs(t[1]) > abs(t[8]) for t in table.values()), table


def test_hessian_sensitivity_is_trace_per_weight_times_quantization_error(merged):
  loss = _loss_fn(merged)
  q = rv.make_quantizer("cluster", bits=4)
  path = ("head", "kernel")
  table = mixed.hessian_sensitivity(loss, merged, q, bit_choices=(2, 4), layers=[path],
                                    samples=2048)
  w = merged["head"]["kernel"]

  def f(v):
    p = jax.tree_util.tree_map(lambda a: a, merged)
    p["head"]["kernel"] = v.reshape(w.shape)
    return loss(p)
  exact = float(jnp.trace(jax.hessian(f)(jnp.asarray(w).ravel())))
  for b in (2, 4):
    err = float(jnp.sum(jnp.square(mixed.quantized_kernel(q, path, w, b) - w)))
    assert table[path][b] == pytest.approx(exact / w.size * err, rel=0.1), b
  assert table[path][2] > table[path][4]


def test_plan_budget_avg_bits_is_the_uniform_models_bytes(merged):
  q = rv.make_quantizer("cluster", bits=2)
  shapes = {p: np.shape(w) for p, w in q.kernels(merged).items()}
  plan = mixed.plan_budget(shapes, q, avg_bits=2)
  uniform2 = rv.pack(merged, q, q.init(merged))
  kernel_bytes = sum(r["packed_bytes"] for r in uniform2.report() if r["path"] != "total")
  assert plan.total({p: 2 for p in plan.free}) == kernel_bytes == plan.budget + plan.fixed_bytes
  assert all(p[0] not in ("stem", "head") for p in plan.free)
  half = mixed.plan_budget(shapes, q, avg_bits=2.5)
  three = mixed.plan_budget(shapes, q, avg_bits=3)
  assert half.budget == pytest.approx((plan.budget + three.budget) / 2)
  # A byte budget counts the stem and head too.
  assert mixed.plan_budget(shapes, q, total_bytes=kernel_bytes).budget == plan.budget
  smallest = plan.fixed_bytes + sum(min(s.values()) for s in plan.sizes.values())
  with raises_naming(ValueError, "bytes=10", f"{smallest:,}"):
    mixed.plan_budget(shapes, q, total_bytes=10)
  with raises_naming(ValueError, "avg_bits=2", "bytes=10"):
    mixed.plan_budget(shapes, q, avg_bits=2, total_bytes=10)
  with raises_naming(ValueError, "avg_bits=0", "bytes=0"):
    mixed.plan_budget(shapes, q)
  with raises_naming(ValueError, "avg_bits=9", "1..8"):  # the config's rule
    mixed.plan_budget(shapes, q, avg_bits=9)

"""Quantizers as strategies: a class per method, per-layer rules as data, and the
optimizer stepping only the learned part of the quantizer state."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from repvgg_jax.quant import (METHODS, QUANTIZERS, CodebookQuantizer, LayerRule, LSQQuantizer,
                              UniformQuantizer, make_quantizer, mixed)
from repvgg_jax.train.optimizer import make_optimizer
from repvgg_jax.train.state import TrainState

from _util import raises_naming

STEM, MID, HEAD = ("stem", "kernel"), ("stages_0_0", "kernel"), ("head", "kernel")


def _params():
  r = np.random.default_rng(0)
  return {"stem": {"kernel": jnp.asarray(r.normal(size=(3, 3, 4, 8)), jnp.float32)},
          "stages_0_0": {"kernel": jnp.asarray(r.normal(size=(3, 3, 8, 8)), jnp.float32),
                         "bias": jnp.zeros((8,))},
          "head": {"kernel": jnp.asarray(r.normal(size=(8, 6)), jnp.float32)}}


@pytest.mark.parametrize("method,cls", [("cluster", CodebookQuantizer),
                                        ("uniform", UniformQuantizer), ("lsq", LSQQuantizer)])
def test_make_quantizer_returns_the_class_of_the_method(method, cls):
  assert set(QUANTIZERS) == set(METHODS)
  q = make_quantizer(method, bits=3)
  assert type(q) is cls and q.method == method


def test_stem_head_rule_and_layer_bits_resolve_field_by_field():
  q = make_quantizer("cluster", bits=2, granularity="group", group_size=4, cluster_dim=2,
                     first_last_bits=6, layer_bits_of={"stem/kernel": 3})
  stem, mid, head = q.layer(STEM), q.layer(MID), q.layer(HEAD)
  # layer_bits_of sets the stem's bits; the stem/head rule still sets its layout.
  assert (stem.bits, stem.group_size, stem.cluster_dim, stem.pinned) == (3, 1, 1, True)
  assert (head.bits, head.group_size, head.cluster_dim, head.pinned) == (6, 1, 1, True)
  assert (mid.bits, mid.group_size, mid.cluster_dim, mid.pinned) == (2, 4, 2, False)
  plain = make_quantizer("cluster", bits=2, granularity="group", group_size=4,
                         first_last_bits=None)
  assert (plain.layer(STEM).bits, plain.layer(STEM).group_size) == (2, 4)


def test_first_matching_rule_wins_and_changes_the_fit():
  rules = (LayerRule(r"stages_.*", bits=2), LayerRule(r".*", bits=5, granularity="tensor"))
  q = make_quantizer("cluster", bits=4, first_last_bits=3, rules=rules)
  mid = q.layer(MID)
  assert (mid.bits, mid.granularity) == (2, "tensor")  # bits from rule 0, granularity rule 1
  assert q.layer(STEM).bits == 5  # the user's rules come before the stem/head rule
  state = q.init(_params())
  assert np.shape(state["stages_0_0"]["kernel"]) == (4,)  # per tensor, 2**2 levels
  assert np.shape(state["stem"]["kernel"]) == (32,)
  packed_layers = {"/".join(p): i.shape for p, (i, _) in q.indices(_params(), state).items()}
  assert packed_layers["stages_0_0/kernel"] == (3, 3, 8, 8)


def test_budget_frees_only_layers_no_rule_pins():
  shapes = {p: np.shape(w) for p, w in make_quantizer("cluster").kernels(_params()).items()}
  plan = mixed.plan_budget(shapes, make_quantizer("cluster", bits=2), avg_bits=3)
  assert plan.free == (MID,)
  q = make_quantizer("cluster", bits=2, first_last_bits=None,
                     rules=(LayerRule("head/kernel", bits=8),))
  assert mixed.plan_budget(shapes, q, avg_bits=3).free == (STEM, MID)


@pytest.mark.parametrize("method,rule,field,value", [
    ("cluster", LayerRule("stem/.*", bits=9), "rules[0].bits", "9"),
    ("uniform", LayerRule("stem/.*", bits=1), "rules[0].bits", "1"),
    ("cluster", LayerRule("x", granularity="row"), "rules[0].granularity", "'row'"),
    ("cluster", LayerRule("(", bits=2), "rules[0].pattern", "'('"),
    ("cluster", LayerRule("x", group_size=0), "rules[0].group_size", "0"),
    ("lsq", LayerRule("x", cluster_dim=2), "rules[0].cluster_dim", "2"),
    ("uniform", LayerRule("x", granularity="group"), "rules[0].granularity", "'group'"),
])
def test_bad_rule_names_field_and_value(method, rule, field, value):
  with pytest.raises(ValueError, match=re.escape(f"{field}={value}")):
    make_quantizer(method, rules=(rule,))


def _with_act_step(state):
  """A weight quantizer's state plus an activation step, as the QAT stage holds it."""
  return {**state, "stages_0_0": {**state["stages_0_0"], "act_step": jnp.ones(())}}


def test_learned_mask_splits_fitted_from_learned():
  params = _params()
  for method, learns in (("cluster", False), ("uniform", False), ("lsq", True)):
    q = make_quantizer(method, bits=3, clipping="mse")
    state = _with_act_step(q.init(params))
    mask = q.learned_mask(state)
    assert mask["stages_0_0"]["kernel"] is learns and mask["stem"]["kernel"] is learns
    assert mask["stages_0_0"]["act_step"] is True


def _stage():
  cfg = tiny.tiny_config().qat
  cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip_norm = 1e-2, 0, 0.0
  return cfg


@pytest.mark.parametrize("method", ["cluster", "lsq"])
def test_optimizer_steps_only_learned_leaves(method):
  params = _params()
  q = make_quantizer(method, bits=3)
  quant = flax.core.freeze(_with_act_step(q.init(params)))
  cfg = _stage()
  state = TrainState.create(apply_fn=None, params=params, quant=quant,
                            tx=make_optimizer(cfg, params, quant, q.learned_mask(quant)))
  ones = lambda t: jax.tree.map(jnp.ones_like, t)  # noqa: E731
  new = state.apply_gradients(grads=ones(params), quant_grads=ones(quant))
  new = new.apply_gradients(grads=ones(params), quant_grads=ones(quant))
  kernel_moved = not np.array_equal(new.quant["stages_0_0"]["kernel"],
                                    quant["stages_0_0"]["kernel"])
  assert kernel_moved is (method == "lsq")  # codebooks fitted, LSQ steps learned
  assert not np.array_equal(new.quant["stages_0_0"]["act_step"], 1.0)
  assert not np.array_equal(new.params["stem"]["kernel"], params["stem"]["kernel"])
  # The mask leaves the optimizer state's tree (what checkpoints hold) as it was.
  plain = make_optimizer(cfg, params, quant)
  both = {"params": params, "quant": quant}
  assert (jax.tree.structure(plain.init(both)) == jax.tree.structure(state.opt_state))


def test_optimizer_mask_must_cover_quant():
  params, quant = _params(), {"a": {"kernel": jnp.ones((4,))}}
  with raises_naming(ValueError, "learned", "'b', 'kernel'", "'a', 'kernel'"):
    make_optimizer(_stage(), params, quant, {"b": {"kernel": False}})

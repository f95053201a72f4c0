"""The train state and what it is made of: the model from the config, its initial
variables, ``TrainState`` (the optimizer is :mod:`repvgg_jax.train.optimizer`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from repvgg_jax.models.oabn import resolve_bound
from repvgg_jax.models.repvgg import RepVGG, create_model
from repvgg_jax.models.oabn import SETTINGS
from repvgg_jax.train.optimizer import make_optimizer


class TrainState(train_state.TrainState):
  """Adds BN running statistics and the model's recorded settings (FP stage) and the
  quantizer state (QAT stage).

  Any may be ``{}``: the merged network has no BN, the FP network no quantizer, a
  plain-BN RepVGG no settings. ``settings`` are constants (OABN bounds, QARepVGG
  identity gains): carried and checkpointed so a checkpoint alone merges, never updated.
  The optimizer updates ``{"params": params, "quant": quant}``: the learned
  steps in ``quant`` (LSQ weight steps, activation steps) train with the
  weights; the fitted leaves (codebooks, refitted by k-means; MSE steps) are masked
  out of the optimizer when :func:`create_train_state` is given the quantizer's
  ``learned_mask`` (the QAT stage does), so no gradient moves them.
  """
  batch_stats: Any = flax.core.FrozenDict()
  settings: Any = flax.core.FrozenDict()
  quant: Any = flax.core.FrozenDict()

  @classmethod
  def create(cls, *, apply_fn, params, tx, quant=None, **kwargs):
    quant = {} if quant is None else quant
    return cls(step=0, apply_fn=apply_fn, params=params, tx=tx, quant=quant,
               opt_state=tx.init({"params": params, "quant": quant}), **kwargs)

  def apply_gradients(self, *, grads, quant_grads=None, **kwargs):
    """One optimizer step on params (``grads``) and the learned quant state."""
    if quant_grads is None:
      quant_grads = jax.tree.map(jnp.zeros_like, self.quant)
    both = {"params": self.params, "quant": self.quant}
    updates, opt_state = self.tx.update({"params": grads, "quant": quant_grads},
                                        self.opt_state, both)
    new = optax.apply_updates(both, updates)
    return self.replace(step=self.step + 1, params=new["params"], quant=new["quant"],
                        opt_state=opt_state, **kwargs)


def build_model(model_cfg: Any, num_classes: int, *, deploy: bool, act_bits: int = 0) -> RepVGG:
  """The train-form (``deploy=False``) or merged model of ``cfg.model`` (the
  merged one with activation fake-quant when ``act_bits``)."""
  dtype = jnp.bfloat16 if model_cfg.dtype == "bfloat16" else None
  kw = dict(num_classes=num_classes, norm=model_cfg.norm, block=model_cfg.block,
            oabn_form=model_cfg.oabn_form or None, oabn_tau=model_cfg.oabn_tau or None,
            oabn_bound=model_cfg.oabn_bound, oabn_relative=model_cfg.oabn_relative,
            deploy=deploy, cifar_stem=model_cfg.cifar_stem, dtype=dtype,
            conv_impl=model_cfg.conv_impl, act_bits=act_bits)
  return RepVGG(model_variant(model_cfg), **kw)


def oabn_bound(model_cfg: Any) -> tuple[str, float]:
  """``(form, tau)`` of the config's OABN: ``model.oabn_form`` ("" = by depth) and
  ``model.oabn_tau`` (0 = the form's), as the model resolves them
  (:func:`repvgg_jax.models.oabn.resolve_bound`)."""
  return resolve_bound(model_cfg.oabn_form or None, model_cfg.oabn_tau or None,
                       model_variant(model_cfg).blocks, model_cfg.block)


def model_variant(model_cfg: Any) -> Any:
  """The zoo row of ``cfg.model.name`` with ``model.blocks`` / ``model.widths`` applied."""
  overrides = {f: tuple(model_cfg[f]) for f in ("blocks", "widths") if model_cfg.get(f)}
  return dataclasses.replace(create_model(model_cfg.name).variant, **overrides)


# tests/train/test_train.py checks the values against the default compilation's.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_variables(model: RepVGG, image_shape: tuple[int, int, int], seed: int) -> dict:
  """``model.init`` on one zero image ``(1, H, W, 3)``, jitted (faster on CPU than eager,
  whose values differ). On CPU it compiles at XLA's ``-O1``: the default's LLVM passes take
  3-4x as long on the init's random-number code (the demo network: 25 s against 7 s on a
  busy core) and give the same values bit for bit (:data:`INIT_COMPILER_OPTIONS`)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  # Under a trace (jax.eval_shape, an outer jit) the init is not compiled on its own, and a
  # nested jit takes no compiler options.
  traced = isinstance(x, jax.core.Tracer)
  options = INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" and not traced else None
  variables = jax.jit(lambda k: model.init(k, x, train=False),
                      compiler_options=options)(jax.random.PRNGKey(seed))
  return flax.core.unfreeze(variables)


def create_train_state(model: RepVGG, variables: Mapping[str, Any], stage_cfg: Any,
                       quant: Any = None, learned: Any = None) -> TrainState:
  """``learned``: ``quant``'s tree of bools, True where the optimizer trains the leaf
  (the weight quantizer's ``learned_mask(quant)``); None trains every leaf."""
  params = variables["params"]
  quant = quant if quant is not None else {}
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=make_optimizer(stage_cfg, params, quant, learned),
                           batch_stats=dict(variables.get("batch_stats", {})),
                           settings=dict(variables.get(SETTINGS, {})), quant=quant)

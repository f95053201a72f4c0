"""The optimizer of the official RepVGG recipe: SGD with momentum, linear warm-up then
cosine to 0, L2 decay masked as the official code masks it, optional gradient clipping."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax


def weight_decay_mask(params: Mapping[str, Any]) -> Any:
  """True where weight decay applies, as in the official recipe.

  No decay on biases (conv, dense and BN shifts) nor on the BN scales of the 3x3
  and 1x1 branches; the identity-branch BN scale and all kernels decay.
  """
  def decays(path, _):
    keys = [getattr(p, "key", str(p)) for p in path]
    if keys[-1] == "bias":
      return False
    if keys[-1] == "scale" and any(k in ("conv_kxk", "conv_1x1") for k in keys):
      return False
    return True
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(stage_cfg: Any) -> optax.Schedule:
  """Linear warmup to ``base_lr * batch/256``, then cosine to 0 at ``num_steps``."""
  peak = stage_cfg.base_lr * stage_cfg.batch_size / 256
  if stage_cfg.warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, stage_cfg.num_steps)
  warmup = optax.linear_schedule(0.0, peak, stage_cfg.warmup_steps)
  cosine = optax.cosine_decay_schedule(peak, stage_cfg.num_steps - stage_cfg.warmup_steps)
  return optax.join_schedules([warmup, cosine], [stage_cfg.warmup_steps])


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def only_learned(inner: optax.GradientTransformation,
                 frozen: frozenset[tuple[str, ...]]) -> optax.GradientTransformation:
  """``inner`` with the leaves at the key paths ``frozen`` held still: their gradient
  enters as zero and their update leaves as zero, whatever the gradient was. Unlike
  ``optax.masked`` it keeps ``inner``'s state as it is (the checkpointed optimizer state
  has the same tree as without it), and it matches leaves by path, so a dict and a
  FrozenDict of the same keys are one tree to it."""
  def zero_off(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.numpy.zeros_like(x) if _keys(path) in frozen else x, tree)

  def update(grads, state, params=None):
    updates, state = inner.update(zero_off(grads), state, params)
    return zero_off(updates), state
  return optax.GradientTransformation(inner.init, update)


def make_optimizer(stage_cfg: Any, params: Mapping[str, Any],
                   quant: Mapping[str, Any] | None = None,
                   learned: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
  """The optimizer of ``{"params": params, "quant": quant}`` (see
  :class:`repvgg_jax.train.state.TrainState`): SGD with momentum (optionally Nesterov)
  and masked, decoupled-from-loss L2 decay.

  ``add_decayed_weights`` before SGD equals the PyTorch ``weight_decay`` argument.
  ``grad_clip_norm > 0`` first clips the gradient to that global norm (as
  ``torch.nn.utils.clip_grad_norm_`` before the step). The learned quantizer
  steps in ``quant`` never decay, and learn at ``quant_lr_scale`` times the stage's
  learning rate. ``learned``: ``quant``'s tree of bools, True where the optimizer trains
  the leaf (the quantizer's ``learned_mask``: LSQ and activation steps); the others
  (codebooks, MSE steps: fitted, not learned) are never changed by a step, whatever
  their gradient (:func:`only_learned`). None: every leaf of ``quant`` is learned.
  """
  quant = quant if quant is not None else {}  # its own node types: a FrozenDict stays one
  mask = {"params": weight_decay_mask(params),
          "quant": jax.tree.map(lambda _: False, quant)}
  clip = ([optax.clip_by_global_norm(stage_cfg.grad_clip_norm)]
          if stage_cfg.grad_clip_norm > 0 else [])
  scale_quant = ([optax.masked(optax.scale(stage_cfg.quant_lr_scale),
                                {"params": jax.tree.map(lambda _: False, dict(params)),
                                 "quant": jax.tree.map(lambda _: True, quant)})]
                 if stage_cfg.quant_lr_scale != 1 else [])
  tx = optax.chain(
      *clip,
      optax.add_decayed_weights(stage_cfg.weight_decay, mask=mask),
      optax.sgd(learning_rate_schedule(stage_cfg), momentum=stage_cfg.momentum,
                nesterov=stage_cfg.nesterov),
      *scale_quant)
  if learned is None:
    return tx
  flags = {_keys(p): bool(m) for p, m in jax.tree_util.tree_leaves_with_path(learned)}
  leaves = {_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(quant)}
  if set(flags) != leaves:
    raise ValueError(f"learned: its leaves {sorted(flags)} are not quant's {sorted(leaves)}")
  return only_learned(tx, frozenset(("quant",) + p for p, m in flags.items() if not m))

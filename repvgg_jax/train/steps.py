"""Jitted train and eval steps for the three forms: train-form FP, merged FP, QAT."""

from __future__ import annotations

from typing import Any, Callable

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from repvgg_jax.data.transforms import normalize
from repvgg_jax.models.oabn import SETTINGS
from repvgg_jax.train import sharding
from repvgg_jax.train.state import TrainState

# A batch's images as the model sees them: uint8 pixels normalized on device with the
# loader's (mean, std), or already-normalized floats when ``pixel_stats`` is None.
PixelStats = tuple[Any, Any] | None


def model_input(images: jax.Array, pixel_stats: PixelStats) -> jax.Array:
  """NHWC images -> the model's float input (see :func:`repvgg_jax.data.transforms.normalize`)."""
  if pixel_stats is None:
    return images
  return normalize(images, *pixel_stats)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float) -> jax.Array:
  """Per-example loss ``(B,)`` for logits ``(B, C)`` and int labels ``(B,)``."""
  onehot = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return optax.softmax_cross_entropy(logits, onehot)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  """Per-example ``T^2 * KL(teacher || student)`` on logits ``(B, C)`` divided by ``T``
  (Hinton et al. 2015; ``T^2`` keeps the gradient's scale as ``T`` changes). The
  teacher's logits get no gradient."""
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  return temperature ** 2 * optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(s), jax.nn.log_softmax(t))


@dataclasses.dataclass(frozen=True)
class Distill:
  """Distillation of a QAT step from a frozen teacher (``qat.distill='logits'``).

  ``apply(variables, images) -> logits`` is the teacher's forward and ``variables``
  its weights (the merged float network the QAT stage starts from: a step argument,
  never trained, never donated). The loss is ``(1 - weight) * cross-entropy +
  weight * distillation_loss(T=temperature)``, so weight 0 is the plain step.
  """
  apply: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  weight: float
  temperature: float


DISTILL_MODES = ("off", "logits")


def check_distill(mode: Any, weight: Any, temperature: Any) -> None:
  """A ValueError naming the bad field of ``qat.distill`` / ``distill_weight`` /
  ``distill_temperature`` (the config's and :func:`make_train_step`'s check)."""
  if mode not in DISTILL_MODES:
    raise ValueError(f"distill={mode!r} not in {DISTILL_MODES}")
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  if not (number(weight) and 0 <= weight <= 1):
    raise ValueError(f"distill_weight={weight!r} must be in [0, 1]")
  if not (number(temperature) and temperature > 0):
    raise ValueError(f"distill_temperature={temperature!r} must be > 0")


def _forward(state: TrainState, params: Any, quant: Any, images: jax.Array, train: bool,
             quantizer: Any) -> tuple[jax.Array, Any]:
  """Logits and new batch stats; QAT quantizes the merged params first (STE gradient)
  and hands the model its activation steps (the ``quant`` collection)."""
  if quantizer is not None:
    params = quantizer.apply(params, quant)
  variables = {"params": params, **({"quant": quant} if quant else {}),
               **({SETTINGS: state.settings} if state.settings else {})}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
    if train:
      logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
      return logits, updates["batch_stats"]
    return state.apply_fn(variables, images, train=False), state.batch_stats
  return state.apply_fn(variables, images, train=train), state.batch_stats


def stage_penalty(stage_cfg: Any) -> tuple[Callable, float] | None:
  """``(f, weight)`` of the stage's ``penalty`` for :func:`make_train_step`, or None."""
  from repvgg_jax import penalties
  f = penalties.make_penalty(stage_cfg.penalty, stage_cfg.penalty_target)
  return None if f is None else (f, stage_cfg.penalty_weight)


def make_train_step(mesh: Mesh, num_classes: int, label_smoothing: float = 0.0,
                    quantizer: Any = None, pixel_stats: PixelStats = None,
                    penalty: tuple[Callable, float] | None = None,
                    distill: Distill | None = None) -> Callable:
  """``step(state, batch) -> (state, metrics)``, jitted; the state is donated.

  The batch is sharded over ``data`` and the state replicated, so the loss mean
  and BN batch statistics are over the global batch (cross-device BN for free).
  ``pixel_stats=(mean, std)`` (the loader's ``mean``/``std``): the batch holds uint8
  images, normalized inside the step. ``penalty=(f, weight)``: ``weight *
  f({"params", "batch_stats", "settings"})`` is added to the loss (``repvgg_jax.penalties``; the
  latent params, before any quantizer). Metrics: ``loss`` (with the penalty) and
  ``accuracy`` (means over the batch), ``grad_norm``, ``penalty`` (unweighted, when
  there is one), all scalars, left on device. ``distill``: one teacher forward per step and the loss of
  :class:`Distill` (metrics add ``distill_loss``, unweighted); the teacher's variables
  are replicated once and passed to every call.
  """
  def step(state: TrainState, batch: dict[str, jax.Array], teacher: Any):
    images = model_input(batch["image"], pixel_stats)
    teacher_logits = None if distill is None else distill.apply(teacher, images)

    def loss_fn(params, quant):
      logits, new_stats = _forward(state, params, quant, images, True, quantizer)
      loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
      extra = {}
      if distill is not None:
        extra["distill_loss"] = distillation_loss(logits, teacher_logits,
                                                  distill.temperature).mean()
        loss = (1 - distill.weight) * loss + distill.weight * extra["distill_loss"]
      if penalty is not None:
        extra["penalty"] = penalty[0]({"params": params, "batch_stats": state.batch_stats,
                                       SETTINGS: state.settings})
        loss = loss + penalty[1] * extra["penalty"]
      return loss, (logits, new_stats, extra)
    (loss, (logits, new_stats, extra)), (grads, quant_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.quant)
    state = state.apply_gradients(grads=grads, quant_grads=quant_grads, batch_stats=new_stats)
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
               "grad_norm": optax.tree_utils.tree_norm((grads, quant_grads)), **extra}
    return state, metrics

  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  if distill is None:  # the plain step: (state, batch), as lowered and compiled by callers
    return jax.jit(lambda state, batch: step(state, batch, None), in_shardings=(rep, data),
                   out_shardings=(rep, rep), donate_argnums=0)
  check_distill("logits", distill.weight, distill.temperature)
  teacher = sharding.replicate(distill.variables, mesh)
  jitted = jax.jit(step, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                   donate_argnums=0)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    return jitted(state, batch, teacher)
  # Lowered (and compiled) with the teacher's variables as a third argument.
  train_step.lower = lambda state, batch: jitted.lower(state, batch, teacher)
  return train_step


def make_eval_step(mesh: Mesh, quantizer: Any = None, pixel_stats: PixelStats = None) -> Callable:
  """``step(state, batch) -> {"correct", "count"}`` sums over the global batch, padding masked."""
  def step(state: TrainState, batch: dict[str, jax.Array]):
    images = model_input(batch["image"], pixel_stats)
    logits, _ = _forward(state, state.params, state.quant, images, False, quantizer)
    hit = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
    return {"correct": hit.sum(), "count": batch["mask"].sum()}

  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=rep)


def evaluate(eval_step: Callable, state: TrainState, loader: Any, mesh: Mesh) -> float:
  """Top-1 accuracy (a fraction) of ``state`` over one pass of an eval ``loader``.

  Per-batch counts stay on device; one transfer at the end.
  """
  outs = [eval_step(state, sharding.shard_batch(batch, mesh)) for batch in loader]
  outs = sharding.to_host(outs)
  correct = sum(int(o["correct"]) for o in outs)
  count = sum(int(o["count"]) for o in outs)
  return correct / max(count, 1)

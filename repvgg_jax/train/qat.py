"""The QAT stage: the merged network fine-tuned with its weights (and activations) quantized.

``train.train_and_evaluate`` calls :func:`quant_kernels` and :func:`plan_budget` before any
training (bad layouts and unmeetable budgets stop the run at start), then after the merge
:func:`allocate_bits` (under a budget) and :func:`initial_state` (the quantizer fitted:
:func:`weight_quantizer`, :func:`init_codebooks`, :func:`with_activation_steps`), and trains
with :func:`refit_hook` (the periodic codebook refit) and :func:`teacher` (distillation);
:func:`stock_baseline` is the quantizer of the report's stock PTQ row, fitted by the same
:func:`initial_state`. Process 0 fits and measures; every process gets the result.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import repvgg_jax
from repvgg_jax.quant import make_quantizer
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.state import build_model, create_train_state


def weight_quantizer(qc: ml_collections.ConfigDict, layer_bits_of: Any = ()) -> Any:
  """The weight quantizer of ``cfg.quant`` (``layer_bits_of``: a bit allocation)."""
  return make_quantizer(qc.method, bits=qc.bits, granularity=qc.granularity,
                        first_last_bits=qc.first_last_bits, clipping=qc.clipping,
                        int8_levels=qc.int8_levels, group_size=qc.group_size,
                        cluster_dim=qc.cluster_dim,
                        layer_bits_of=dict(layer_bits_of))


def quant_kernels(cfg: ml_collections.ConfigDict, deploy_model: Any,
                  image_shape: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of the merged network's quantized kernels (no compute), checked
  against the quantizer's layout (``quant.group_size`` dividing each layer's output
  channels, ``quant.cluster_dim`` its input channels): a ValueError naming the field and
  the layer, before any training."""
  shapes = jax.eval_shape(lambda: deploy_model.init(
      jax.random.key(0), jax.numpy.zeros((1, *image_shape)), train=False))["params"]
  q = weight_quantizer(cfg.quant)
  kernels = {p: tuple(s.shape) for p, s in q.kernels(shapes).items()}
  q.check_shapes(kernels)
  return kernels


def plan_budget(cfg: ml_collections.ConfigDict, kernels: Any) -> Any:
  """The ``quant.budget`` plan (:func:`repvgg_jax.quant.mixed.plan_budget`) of the
  merged network's kernel shapes ``kernels`` (:func:`quant_kernels`), or None without
  a budget; an unmeetable budget is a ValueError naming the field and the smallest
  size, before any training."""
  from repvgg_jax.quant import mixed
  b = cfg.quant.budget
  if not (b.avg_bits or b.bytes):
    return None
  try:
    return mixed.plan_budget(kernels, weight_quantizer(cfg.quant), avg_bits=float(b.avg_bits),
                             total_bytes=int(b.bytes), bit_choices=b.bit_choices)
  except ValueError as e:
    raise ValueError(f"quant.budget.{e}") from None


def allocate_bits(cfg: ml_collections.ConfigDict, plan: Any, params: Any, num_classes: int,
                  loader: Any) -> dict[str, Any]:
  """The bits per block layer under ``plan`` (process 0 measures, every process gets
  them): sensitivities (``quant.budget.sensitivity``) of the float merged network on
  ``quant.budget.batches`` unaugmented training batches, then the exact allocation.
  Returns the report entry: ``layers`` {path: {bits, weights, bytes, sensitivity}},
  the budget, the packed bytes of the quantized kernels and the block layers' mean bits."""
  from repvgg_jax.quant import mixed
  b = cfg.quant.budget
  entry = None
  if jax.process_index() == 0:
    logging.info("measuring %s sensitivities of %d layers at bits %s", b.sensitivity,
                 len(plan.free), tuple(b.bit_choices))
    fmodel = build_model(cfg.model, num_classes, deploy=True)
    one_pass = loader("train", cfg.qat.batch_size, False)
    batches = [(steps.model_input(jax.numpy.asarray(x["image"]), one_pass.pixel_stats),
                jax.numpy.asarray(x["label"])) for x in itertools.islice(one_pass, b.batches)]

    def loss_fn(p):
      losses = [jax.numpy.mean(-jax.numpy.take_along_axis(jax.nn.log_softmax(
          fmodel.apply({"params": p}, x)), y[:, None], 1)) for x, y in batches]
      return sum(losses) / len(losses)
    measure = mixed.SENSITIVITIES[b.sensitivity]
    q = weight_quantizer(cfg.quant)
    costs = measure(loss_fn, params, q, tuple(b.bit_choices), layers=plan.free)
    bits_of = mixed.allocate_measured(costs, plan.sizes, plan.budget)
    kernels = q.kernels(params)
    n = {p: int(np.prod(np.shape(kernels[p]))) for p in plan.free}
    entry = {"sensitivity": b.sensitivity, "budget_bytes": plan.budget + plan.fixed_bytes,
             "kernel_bytes": plan.total(bits_of),
             # The block layers' mean index bits per weight.
             "mean_bits": round(sum(bits_of[p] * n[p] for p in plan.free) / sum(n.values()), 2),
             "layers": {"/".join(p): {"bits": bits_of[p], "weights": n[p],
                                      "bytes": plan.sizes[p][bits_of[p]],
                                      "costs": {str(k): v for k, v in costs[p].items()}}
                        for p in plan.free}}
    logging.info("bits per layer: %s", {k: v["bits"] for k, v in entry["layers"].items()})
  return sharding.broadcast_from_primary(entry)


def init_codebooks(quantizer: Any, params: Any) -> Any:
  """The quantizer's initial state, fitted on process 0 (NumPy DP) and sent to every process."""
  quant = quantizer.init(params) if jax.process_index() == 0 else None
  return sharding.broadcast_from_primary(quant)


def make_refit(quantizer: Any, mesh: Any) -> Any:
  """``refit(params, quant) -> quant``: Lloyd on device, jitted, codebooks replicated."""
  rep = sharding.replicated(mesh)
  return jax.jit(quantizer.refit, in_shardings=(rep, rep), out_shardings=rep)


def with_activation_steps(quant: Any, q: Any, qmodel: Any, params: Any,
                          qc: ml_collections.ConfigDict, batch_size: int, loader: Any) -> Any:
  """``quant`` plus activation steps calibrated (``qc.act_calibration``) on the first
  ``qc.calib_batches`` training batches of ``batch_size`` (fewer if the split is smaller),
  unaugmented, with the weights quantized; computed on process 0 and sent to every
  process, as the codebooks are."""
  if jax.process_index() == 0:
    qparams = jax.jit(q.apply)(params, quant)
    one_pass = loader("train", batch_size, False)
    batches = (steps.model_input(b["image"], one_pass.pixel_stats)
               for b in itertools.islice(one_pass, qc.calib_batches))
    quant = repvgg_jax.calibrate(qmodel, {"params": qparams, "quant": quant}, batches,
                                 method=qc.act_calibration, percentile=qc.act_percentile)
  return sharding.broadcast_from_primary(jax.device_get(quant))


def initial_state(cfg: ml_collections.ConfigDict, merged: Any, num_classes: int, loader: Any,
                  allocation: dict[str, Any] | None,
                  qc: ml_collections.ConfigDict | None = None) -> tuple[Any, Any, Any]:
  """``(quantizer, quantized deploy-form model, host TrainState)`` the QAT stage starts from:
  the weight quantizer of ``qc`` (default ``cfg.quant``; per-layer bits of ``allocation``,
  if any) fitted to the merged variables ``merged``, and its activation steps calibrated
  as ``qc`` says (``act_bits``, ``act_calibration``, ``calib_batches``)."""
  qc = cfg.quant if qc is None else qc
  q = weight_quantizer(qc, {p: l["bits"] for p, l in (allocation or {"layers": {}})["layers"]
                            .items()})
  qmodel = build_model(cfg.model, num_classes, deploy=True, act_bits=qc.act_bits)
  logging.info("fitting the %s %s-bit weight quantizer of %d kernels", qc.method,
               qc.bits if allocation is None else allocation["mean_bits"],
               len(q.kernels(merged["params"])))
  quant = init_codebooks(q, merged["params"])
  if qc.act_bits:
    logging.info("calibrating %d-bit activation steps (%s) on %d training batches",
                 qc.act_bits, qc.act_calibration, qc.calib_batches)
    quant = with_activation_steps(quant, q, qmodel, merged["params"], qc, cfg.qat.batch_size,
                                  loader)
  return q, qmodel, create_train_state(qmodel, merged, cfg.qat, quant=quant,
                                       learned=q.learned_mask(quant))


def stock_baseline(qc: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The quantizer a stock PTQ tool would use at ``qc``'s bits (what ``quantize_static``
  or a uniform PTQ pass gives): uniform per-channel weights with the MSE step, the same
  stem/head bits and activation steps, no codebooks. Fitted by :func:`initial_state` and
  evaluated untrained, it is the report's ``ptq`` row beside ClusterQAT's."""
  base = ml_collections.ConfigDict(qc.to_dict())
  base.update(method="uniform", granularity="channel", clipping="mse", group_size=1,
              cluster_dim=1, int8_levels=False)
  return base


def refit_hook(quantizer: Any, mesh: Any, every: int) -> Any:
  """The QAT loop's hook ``f(step, state) -> state``: the codebooks refitted to the latent
  weights every ``every`` steps (:func:`make_refit`)."""
  refit_fn = make_refit(quantizer, mesh)

  def refit(step: int, state: Any) -> Any:
    if step % every:
      return state
    return state.replace(quant=refit_fn(state.params, state.quant))
  return refit


def teacher(qat_cfg: ml_collections.ConfigDict, deploy_model: Any,
            merged: Any) -> steps.Distill | None:
  """The ``qat.distill`` teacher: the merged float network, frozen; None when off."""
  if qat_cfg.distill != "logits":
    return None
  return steps.Distill(
      apply=lambda p, x: deploy_model.apply({"params": p}, x, train=False),
      variables=merged["params"], weight=qat_cfg.distill_weight,
      temperature=qat_cfg.distill_temperature)


def form_bits(qc: ml_collections.ConfigDict, allocation: dict[str, Any] | None) -> dict:
  """``{"weight_bits", "act_bits"}`` of the quantized forms in the report: the block layers'
  index bits per weight (a vector index covers ``cluster_dim`` weights)."""
  index_bits = qc.bits if allocation is None else allocation["mean_bits"]
  return {"weight_bits": index_bits if qc.cluster_dim == 1 else index_bits / qc.cluster_dim,
          "act_bits": qc.act_bits or None}

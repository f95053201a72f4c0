"""The staged pipeline: FP train -> merge -> QAT -> packed export -> evaluate every form -> report.

Every training stage checkpoints under ``<workdir>/checkpoints/<stage>`` and
resumes from there, so the same command continues a killed run. Outputs of
process 0 in the workdir: ``report.json``, ``report.md``, ``weight_histograms.png``,
``channel_outliers.png``, ``accuracy.png``, metrics, and when quantized ``model.packed``,
``model.stablehlo``, ``model.onnx`` and ``model.mlpackage`` (``cfg.export``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

import repvgg_jax
from repvgg_jax import data, penalties
from repvgg_jax.deploy import coreml, onnx
from repvgg_jax.train import config as config_lib
from repvgg_jax.train import report as report_lib
from repvgg_jax.train import forms as forms_lib
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.quant_setup import (allocate_bits, init_codebooks, make_refit, plan_budget,
                                          quant_kernels, weight_quantizer,
                                          with_activation_steps)
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.loop import Profile, schedule, train_stage
from repvgg_jax.models.settings import check_settings
from repvgg_jax.models.oabn import SETTINGS
from repvgg_jax.train.state import build_model, create_train_state, init_variables
from repvgg_jax.train.workdir import Stages
from repvgg_jax.train.writers import create_writer, tensorboard_dir


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` when ``cfg.distributed.initialize`` (before any jax use).

  Empty/unset fields are left to JAX's auto-detection (TPU VMs, SLURM).
  """
  d = cfg.distributed
  if not d.initialize:
    return
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  # CPU collectives across processes need gloo; the flag does not affect TPU/GPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def load_variables(path: str, template: dict) -> dict:
  """Train-form variables from an FP-stage orbax directory, a .npz or a .msgpack file.

  ``template`` (freshly initialised variables of the configured model) gives the
  structure: missing, unexpected or mis-shaped entries raise one ValueError naming
  them all. A .npz holds flattened ``"params/stem/conv_kxk/conv/kernel"``-style
  keys; a .msgpack is ``flax.serialization.to_bytes(variables)``.
  """
  import flax
  from flax import traverse_util
  if path.endswith((".msgpack", ".npz")) and not os.path.isfile(path):
    raise FileNotFoundError(f"init_from={path!r}: no such file")
  if path.endswith(".msgpack"):
    with open(path, "rb") as f:
      loaded = flax.serialization.msgpack_restore(f.read())
  elif path.endswith(".npz"):
    with np.load(path) as z:
      loaded = traverse_util.unflatten_dict({tuple(k.split("/")): z[k] for k in z.files})
  else:
    if not os.path.isdir(path):  # Never create it: a typo must not become a directory.
      raise FileNotFoundError(f"init_from={path!r} is not a directory (an FP-stage "
                              f"checkpoint directory) nor a .npz or .msgpack file")
    ckpt = StageCheckpoints(path, keep=1, create=False)
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"init_from={path!r}: no checkpoint in this directory")
    state_dict = ckpt.restore_host()
    ckpt.close()
    loaded = {k: state_dict[k] for k in ("params", "batch_stats", SETTINGS) if k in state_dict}
  want = traverse_util.flatten_dict(template, sep="/")
  got = traverse_util.flatten_dict(loaded, sep="/")
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: shape {np.shape(got[k])}, model wants {np.shape(want[k])}"
               for k in sorted(set(want) & set(got)) if np.shape(got[k]) != np.shape(want[k])]
  if problems:
    raise ValueError(f"init_from={path!r} does not match the configured model (model.name, "
                     f"model.norm, model.block, model.oabn_form, number of classes): "
                     + "; ".join(problems))
  return traverse_util.unflatten_dict(
      {tuple(k.split("/")): np.asarray(v) for k, v in got.items()})


def stage_penalty(stage_cfg: ml_collections.ConfigDict) -> tuple[Callable, float] | None:
  """``(f, weight)`` of the stage's ``penalty`` for :func:`steps.make_train_step`, or None."""
  f = penalties.make_penalty(stage_cfg.penalty, stage_cfg.penalty_target)
  return None if f is None else (f, stage_cfg.penalty_weight)


def profile_hooks(stage_cfg: ml_collections.ConfigDict, workdir: str, stage: str) -> list:
  """The stage's :class:`loop.Profile` hook when ``profile_steps`` asks for one."""
  if not stage_cfg.profile_steps:
    return []
  return [Profile(tensorboard_dir(workdir, stage), stage_cfg.profile_steps)]


def finished_report(cfg: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The report of ``workdir`` when it holds a finished run of ``cfg`` (resolved): the
  same config in report.json, and every file that report and the installed exporters
  call for present; else None."""
  import json
  path = os.path.join(workdir, "report.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      report = json.load(f)
  except ValueError:
    return None
  if report.get("config") != json.loads(cfg.to_json_best_effort()):
    return None
  forms, ec = report.get("forms", {}), cfg.export
  files = []
  if cfg.quant.method != "none":
    files += ["model.packed", "model.stablehlo"]
    for form, switch, available in (("onnx", ec.onnx, onnx.available),
                                    ("coreml", ec.coreml, coreml.available)):
      wanted = switch == "on" or (switch == "auto" and available())
      if wanted != (form in forms):
        return None  # an exporter installed or removed since: export again
      if form in forms and "error" not in forms[form]:
        files.append("model.onnx" if form == "onnx" else "model.mlpackage")
  if not all(os.path.exists(os.path.join(workdir, f)) for f in files):
    return None
  return report


def run(cfg: ml_collections.ConfigDict, workdir: str, *, mesh: Any = None,
        discard_stale: bool = False) -> dict:
  """Runs every enabled stage and returns the report dict (all processes; process 0 writes).

  Args:
    discard_stale: move checkpoints of stages trained with another config aside
      (``<workdir>/stale/``) and train them again, instead of refusing
      (``workdir.StaleWorkdir``).
  """
  cfg = config_lib.resolve(cfg)
  if "://" in workdir:
    raise ValueError(f"workdir={workdir!r}: only local directories (or a mounted bucket) "
                     "are supported for the workdir")
  primary = jax.process_index() == 0
  done = finished_report(cfg, workdir) if jax.process_count() == 1 else None
  if done is not None:
    logging.info("%s holds a finished run of this config; its report (nothing trained, "
                 "evaluated or exported again; delete report.json to redo the run's end):\n%s",
                 workdir, report_lib.markdown(done))
    return done
  trained = ("fp",) * (cfg.fp.enabled and not cfg.init_from) + \
      ("qat",) * (cfg.quant.method != "none" and cfg.qat.enabled)
  new_workdir = not os.path.exists(workdir)
  try:
    # Before anything is restored: orbax must never see another config's tree.
    stages = Stages(workdir, cfg, trained, discard_stale=discard_stale, write=primary)
    try:
      return _run(cfg, workdir, stages, mesh, primary)
    finally:
      stages.close()
  except BaseException:
    # A run that stops before writing anything (bad data_dir, say) leaves no empty
    # workdir behind it.
    if primary and new_workdir and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)
    raise


def _run(cfg: ml_collections.ConfigDict, workdir: str, stages: Stages, mesh: Any,
         primary: bool) -> dict:
  mesh = sharding.make_mesh() if mesh is None else mesh
  if primary:
    os.makedirs(workdir, exist_ok=True)
  writer = create_writer(workdir)
  ckpt_root = os.path.join(workdir, "checkpoints")

  data_cfg = cfg.data
  if cfg.data.local_examples:  # Local smoke mode: a synthetic ImageNet in tfds form.
    from repvgg_jax.data.local_tfds import local_data_config
    data_cfg = local_data_config(cfg.data, workdir) if primary else None
    sharding.barrier("local_tfds")
    data_cfg = data_cfg or local_data_config(cfg.data, workdir)

  def loader(split: str, batch: int, train: bool):
    return data.make_loader(data_cfg, split, global_batch_size=batch, train=train, seed=cfg.seed,
                            cache_dir=workdir)

  eval_loader = loader("test", cfg.eval_batch_size, False)
  num_classes, image_shape = eval_loader.num_classes, eval_loader.image_shape
  model = build_model(cfg.model, num_classes, deploy=False)
  deploy_model = build_model(cfg.model, num_classes, deploy=True)
  forms, timings = {}, {}
  pixels = eval_loader.pixel_stats
  eval_plain = steps.make_eval_step(mesh, pixel_stats=pixels)
  evaluate_with = lambda step_fn: lambda s: steps.evaluate(step_fn, s, eval_loader, mesh)  # noqa: E731

  budget = (plan_budget(cfg, quant_kernels(cfg, deploy_model, image_shape))
            if cfg.quant.method != "none" else None)

  # Stage 1: FP training of the multi-branch network (or import).
  stages.start("fp")
  template = init_variables(model, image_shape, cfg.seed)
  if cfg.fp.enabled and not cfg.init_from:
    state = create_train_state(model, template, cfg.fp)
    state = train_stage(
        "fp", state, mesh=mesh, loader=loader("train", cfg.fp.batch_size, True),
        train_step=steps.make_train_step(mesh, num_classes, cfg.fp.label_smoothing,
                                         pixel_stats=pixels, penalty=stage_penalty(cfg.fp)),
        ckpt_dir=os.path.join(ckpt_root, "fp"), **schedule(cfg.fp), writer=writer,
        log_every=cfg.log_every, hooks=profile_hooks(cfg.fp, workdir, "fp"),
        evaluate=evaluate_with(eval_plain))
    variables = {"params": sharding.to_host(state.params),
                 "batch_stats": sharding.to_host(state.batch_stats),
                 SETTINGS: sharding.to_host(state.settings)}
  else:
    if cfg.init_from:
      variables = load_variables(cfg.init_from, template)
      try:
        check_settings(model, variables)
      except ValueError as e:
        raise ValueError(f"init_from={cfg.init_from!r}: {e}") from None
    else:
      logging.warning("fp.enabled=False and no init_from: using the random initialisation")
      variables = template
    state = sharding.replicate(create_train_state(model, variables, cfg.fp), mesh)
  if cfg.eval_fp_forms:
    logging.info("evaluating the train-form FP network on the test split")
    forms["fp"] = {"accuracy": steps.evaluate(eval_plain, state, eval_loader, mesh)}
  timings["fp"] = stages.stop("fp")
  del state

  # Stage 2: merge (pure) and evaluate the single-conv network.
  logging.info("merging the branches into one 3x3 conv per block")
  merged = jax.device_get(repvgg_jax.merge(variables))
  forms["merged"] = {"size_bytes": report_lib._param_bytes(merged["params"])}
  if cfg.eval_fp_forms:
    logging.info("evaluating the merged FP network on the test split")
    merged_state = sharding.replicate(create_train_state(deploy_model, merged, cfg.qat), mesh)
    forms["merged"]["accuracy"] = steps.evaluate(eval_plain, merged_state, eval_loader, mesh)
    del merged_state
  histograms = {"merged FP": merged}

  # Stage 3: QAT of the merged network, then the packed export.
  allocation = None  # the report entry of a quant.budget allocation
  if cfg.quant.method != "none":
    stages.start("qat")
    qc = cfg.quant
    if budget is not None:
      allocation = allocate_bits(cfg, budget, merged["params"], num_classes, loader)
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
      quant = with_activation_steps(quant, q, qmodel, merged["params"], cfg, loader)
    state = create_train_state(qmodel, merged, cfg.qat, quant=quant)
    eval_qat = steps.make_eval_step(mesh, q, pixel_stats=pixels)
    if cfg.qat.enabled:
      refit_every, refit_fn = qc.refit_every, make_refit(q, mesh)

      def refit(step: int, state: Any) -> Any:
        if step % refit_every:
          return state
        return state.replace(quant=refit_fn(state.params, state.quant))

      distill = None
      if cfg.qat.distill == "logits":  # the float merged network, frozen
        distill = steps.Distill(
            apply=lambda p, x: deploy_model.apply({"params": p}, x, train=False),
            variables=merged["params"], weight=cfg.qat.distill_weight,
            temperature=cfg.qat.distill_temperature)
      state = train_stage(
          "qat", state, mesh=mesh, loader=loader("train", cfg.qat.batch_size, True),
          train_step=steps.make_train_step(mesh, num_classes, cfg.qat.label_smoothing, q,
                                           pixel_stats=pixels, penalty=stage_penalty(cfg.qat),
                                           distill=distill),
          ckpt_dir=os.path.join(ckpt_root, "qat"), **schedule(cfg.qat), writer=writer,
          log_every=cfg.log_every, hooks=[refit, *profile_hooks(cfg.qat, workdir, "qat")],
          evaluate=evaluate_with(eval_qat))
    else:
      state = sharding.replicate(state, mesh)
    # Index bits per weight of the block layers: a vector index covers cluster_dim weights.
    index_bits = qc.bits if allocation is None else allocation["mean_bits"]
    bits = {"weight_bits": index_bits if qc.cluster_dim == 1 else index_bits / qc.cluster_dim,
            "act_bits": qc.act_bits or None}
    logging.info("evaluating the fake-quant network on the test split")
    forms["qat"] = {"accuracy": steps.evaluate(eval_qat, state, eval_loader, mesh), **bits}
    timings["qat"] = stages.stop("qat")
    params, quant = sharding.to_host(state.params), sharding.to_host(state.quant)
    del state

    deployed_forms, deployed = forms_lib.deploy_forms(cfg, q, params, quant, qmodel, eval_loader,
                                                      workdir, primary, bits)
    forms.update(deployed_forms)
    histograms[f"{qc.method} {bits['weight_bits']}-bit"] = {
        "params": jax.device_get(deployed.to_variables()["params"])}

  result = {"forms": forms}
  if primary:
    result = report_lib.write_report(workdir, forms, cfg, histograms, timings,
                                     dataset=report_lib.dataset_info(eval_loader),
                                     fp_variables=variables,
                                     bit_allocation=allocation)
    logging.info("report:\n%s", report_lib.markdown(result))
  writer.close()
  return result

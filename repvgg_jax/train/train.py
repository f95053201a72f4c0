"""The trainer, read top to bottom: ``train_and_evaluate(cfg, workdir)``.

FP training of the multi-branch network -> merge into one 3x3 conv per block -> QAT of the
merged network -> export (packed file, StableHLO, ONNX, Core ML) and evaluate every form ->
report. Each section calls into the module named after it: ``loop`` (one training stage),
``qat`` (the quantizer), ``export`` (the deployed forms), ``report``, ``checkpoint``,
``workdir`` (which config a stage's checkpoints belong to), ``sharding``, ``steps``.

Every training stage checkpoints under ``<workdir>/checkpoints/<stage>`` and resumes from
there, so the same command continues a killed or interrupted run. Outputs of process 0 in
the workdir: ``report.json``, ``report.md``, ``weight_histograms.png``,
``channel_outliers.png``, ``accuracy.png``, metrics, and when quantized ``model.packed``,
``model.stablehlo``, ``model.onnx`` and ``model.mlpackage`` (``cfg.export``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
from absl import logging

import repvgg_jax
from repvgg_jax import data
from repvgg_jax.models.oabn import SETTINGS
from repvgg_jax.train import config as config_lib
from repvgg_jax.train import export, qat, sharding, steps
from repvgg_jax.train import report as report_lib
from repvgg_jax.train import workdir as workdir_lib
from repvgg_jax.train.checkpoint import import_variables
from repvgg_jax.train.loop import stage_args, train_stage
from repvgg_jax.train.state import build_model, create_train_state, init_variables
from repvgg_jax.train.writers import create_writer


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *, mesh: Any = None,
                       discard_stale: bool = False) -> dict:
  """Runs every enabled stage and returns the report dict (all processes; process 0 writes).

  Args:
    cfg: the config (``configs/*.py``); validated here, the one time a launch does.
    workdir: a local directory (created); a rerun resumes from its checkpoints, and on a
      finished run of the same config returns its report.
    mesh: the devices; default every device on one ``data`` axis.
    discard_stale: move checkpoints of stages trained with another config aside
      (``<workdir>/stale/``) and train them again, instead of refusing
      (``workdir.StaleWorkdir``).
  """
  cfg = config_lib.resolve(cfg)
  sharding.initialize_distributed(cfg)
  primary = jax.process_index() == 0
  done = report_lib.finished_report(cfg, workdir) if jax.process_count() == 1 else None
  if done is not None:
    logging.info("%s holds a finished run of this config; its report (nothing trained, "
                 "evaluated or exported again; delete report.json to redo the run's end):\n%s",
                 workdir, report_lib.markdown(done))
    return done
  trained = ("fp",) * (cfg.fp.enabled and not cfg.init_from) + \
      ("qat",) * (cfg.quant.method != "none" and cfg.qat.enabled)
  with workdir_lib.open_run(workdir, cfg, trained, discard_stale=discard_stale,
                            write=primary) as stages:
    # The workdir, the data and the models.
    mesh = sharding.make_mesh() if mesh is None else mesh
    writer = create_writer(workdir)
    loader = _loader_of(cfg, workdir, primary)
    eval_loader = loader("test", cfg.eval_batch_size, False)
    num_classes, image_shape = eval_loader.num_classes, eval_loader.image_shape
    pixels = eval_loader.pixel_stats
    model = build_model(cfg.model, num_classes, deploy=False)
    deploy_model = build_model(cfg.model, num_classes, deploy=True)
    eval_plain = steps.make_eval_step(mesh, pixel_stats=pixels)
    def evaluate_with(eval_step: Callable) -> Callable:
      return lambda state: steps.evaluate(eval_step, state, eval_loader, mesh)
    # Before any training: a bad quantizer layout or an unmeetable budget stops the run here.
    budget = (qat.plan_budget(cfg, qat.quant_kernels(cfg, deploy_model, image_shape))
              if cfg.quant.method != "none" else None)
    forms, timings = {}, {}

    # The FP stage: the multi-branch network trained in float (or its variables imported).
    stages.start("fp")
    template = init_variables(model, image_shape, cfg.seed)
    if "fp" in trained:
      state = train_stage(
          "fp", create_train_state(model, template, cfg.fp), mesh=mesh,
          loader=loader("train", cfg.fp.batch_size, True),
          train_step=steps.make_train_step(mesh, num_classes, cfg.fp.label_smoothing,
                                           pixel_stats=pixels,
                                           penalty=steps.stage_penalty(cfg.fp)),
          evaluate=evaluate_with(eval_plain),
          later_stages=[("qat", cfg.qat.num_steps, cfg.qat.batch_size)] if "qat" in trained
          else [],
          **stage_args(cfg, "fp", workdir, writer))
      variables = {"params": sharding.to_host(state.params),
                   "batch_stats": sharding.to_host(state.batch_stats),
                   SETTINGS: sharding.to_host(state.settings)}
    else:
      variables = import_variables(cfg.init_from, model, template)
      state = sharding.replicate(create_train_state(model, variables, cfg.fp), mesh)
    if cfg.eval_fp_forms:
      logging.info("evaluating the train-form FP network on the test split")
      forms["fp"] = {"accuracy": steps.evaluate(eval_plain, state, eval_loader, mesh)}
    timings["fp"] = stages.stop("fp")
    del state

    # Merge (a pure function of the variables) and evaluate the single-conv network.
    logging.info("merging the branches into one 3x3 conv per block")
    merged = jax.device_get(repvgg_jax.merge(variables))
    forms["merged"] = {"size_bytes": report_lib._param_bytes(merged["params"])}
    if cfg.eval_fp_forms:
      logging.info("evaluating the merged FP network on the test split")
      merged_state = sharding.replicate(create_train_state(deploy_model, merged, cfg.qat), mesh)
      forms["merged"]["accuracy"] = steps.evaluate(eval_plain, merged_state, eval_loader, mesh)
      del merged_state
    histograms = {"merged FP": merged}

    # The QAT stage: the merged network fine-tuned with its weights quantized.
    allocation = None  # the report entry of a quant.budget allocation
    if cfg.quant.method != "none":
      stages.start("qat")
      if budget is not None:
        allocation = qat.allocate_bits(cfg, budget, merged["params"], num_classes, loader)
      q, qmodel, state = qat.initial_state(cfg, merged, num_classes, loader, allocation)
      eval_qat = steps.make_eval_step(mesh, q, pixel_stats=pixels)
      if "qat" in trained:
        state = train_stage(
            "qat", state, mesh=mesh, loader=loader("train", cfg.qat.batch_size, True),
            train_step=steps.make_train_step(mesh, num_classes, cfg.qat.label_smoothing, q,
                                             pixel_stats=pixels,
                                             penalty=steps.stage_penalty(cfg.qat),
                                             distill=qat.teacher(cfg.qat, deploy_model, merged)),
            evaluate=evaluate_with(eval_qat),
            **stage_args(cfg, "qat", workdir, writer,
                         hooks=[qat.refit_hook(q, mesh, cfg.quant.refit_every)]))
      else:
        state = sharding.replicate(state, mesh)
      bits = qat.form_bits(cfg.quant, allocation)
      logging.info("evaluating the fake-quant network on the test split")
      forms["qat"] = {"accuracy": steps.evaluate(eval_qat, state, eval_loader, mesh), **bits}
      timings["qat"] = stages.stop("qat")
      params, quant = sharding.to_host(state.params), sharding.to_host(state.quant)
      del state
      if cfg.eval_baseline and cfg.quant.cluster_dim == 1:  # a stock tool has no vectors
        logging.info("evaluating the stock baseline: uniform per-channel PTQ, same bits")
        base_q, _, base = qat.initial_state(cfg, merged, num_classes, loader, allocation,
                                            qat.stock_baseline(cfg.quant))
        forms["ptq"] = {"accuracy": steps.evaluate(
            steps.make_eval_step(mesh, base_q, pixel_stats=pixels),
            sharding.replicate(base, mesh), eval_loader, mesh), **bits}
        del base

      # Export every deployed form, read each back and evaluate it.
      deployed_forms, deployed = export.export_and_evaluate(
          cfg, q, params, quant, qmodel, eval_loader, workdir, primary, bits)
      forms.update(deployed_forms)
      histograms[f"{cfg.quant.method} {bits['weight_bits']}-bit"] = {
          "params": jax.device_get(deployed.to_variables()["params"])}

    # The report.
    result = {"forms": forms}
    if primary:
      result = report_lib.write_report(workdir, forms, cfg, histograms, timings,
                                       dataset=report_lib.dataset_info(eval_loader),
                                       fp_variables=variables, bit_allocation=allocation)
      logging.info("report:\n%s", report_lib.markdown(result))
    writer.close()
    return result


def _loader_of(cfg: ml_collections.ConfigDict, workdir: str,
               primary: bool) -> Callable[[str, int, bool], Any]:
  """``loader(split, global batch size, train)`` of ``cfg.data``. In local smoke mode
  (``data.local_examples``) process 0 first writes the synthetic ImageNet it reads."""
  data_cfg = cfg.data
  if cfg.data.local_examples:
    from repvgg_jax.data.local_tfds import local_data_config
    data_cfg = local_data_config(cfg.data, workdir) if primary else None
    sharding.barrier("local_tfds")
    data_cfg = data_cfg or local_data_config(cfg.data, workdir)

  def loader(split: str, batch: int, train: bool) -> Any:
    return data.make_loader(data_cfg, split, global_batch_size=batch, train=train, seed=cfg.seed,
                            cache_dir=workdir)
  return loader

"""The staged pipeline: FP train -> merge -> QAT -> packed export -> evaluate every form -> report.

Every training stage checkpoints under ``<workdir>/checkpoints/<stage>`` and
resumes from there, so the same command continues a killed run. Outputs of
process 0 in the workdir: ``report.json``, ``report.md``, ``weight_histograms.png``,
``channel_outliers.png``, ``accuracy.png``, metrics, and when quantized ``model.packed``,
``model.stablehlo``, ``model.onnx`` and ``model.mlpackage`` (``cfg.export``).
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import repvgg_jax
from repvgg_jax import data, penalties
from repvgg_jax.quant import make_quantizer
from repvgg_jax.train import config as config_lib
from repvgg_jax.train import report as report_lib
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.loop import train_stage
from repvgg_jax.models.settings import check_settings, split_settings
from repvgg_jax.nn.oabn import SETTINGS
from repvgg_jax.train.state import build_model, create_train_state, init_variables
from repvgg_jax.train.workdir import Stages
from repvgg_jax.train.writers import create_writer


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
    ckpt = StageCheckpoints(path, every=1, keep=1, create=False)
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"init_from={path!r}: no checkpoint in this directory")
    state_dict = ckpt.restore_host()
    ckpt.close()
    loaded = {k: state_dict[k] for k in ("params", "batch_stats", SETTINGS) if k in state_dict}
  loaded = split_settings(loaded)  # files saved before settings had their own collection
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


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


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
    measure = (mixed.loss_sensitivity if b.sensitivity == "loss"
               else mixed.hessian_sensitivity)
    q = weight_quantizer(cfg.quant)
    costs = measure(loss_fn, params, q, tuple(b.bit_choices), layers=plan.free)
    bits_of = mixed.allocate(costs, plan.sizes, plan.budget)
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
                          cfg: ml_collections.ConfigDict, loader: Any) -> Any:
  """``quant`` plus activation steps calibrated (``quant.act_calibration``) on the
  first ``quant.calib_batches`` training batches (fewer if the split is smaller),
  unaugmented, with the weights quantized; computed on process 0 and sent to every
  process, as the codebooks are."""
  if jax.process_index() == 0:
    qparams = jax.jit(q.apply)(params, quant)
    one_pass = loader("train", cfg.qat.batch_size, False)
    batches = (steps.model_input(b["image"], one_pass.pixel_stats)
               for b in itertools.islice(one_pass, cfg.quant.calib_batches))
    quant = repvgg_jax.calibrate(qmodel, {"params": qparams, "quant": quant}, batches,
                                 method=cfg.quant.act_calibration,
                                 percentile=cfg.quant.act_percentile)
  return sharding.broadcast_from_primary(jax.device_get(quant))


def evaluate_deployed(fns: dict[str, Callable], loader: Any,
                      references: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
  """Top-1 of each ``fn(uint8 images) -> logits`` over one pass of ``loader`` (each
  process its shard, summed), and the fraction of predictions equal to those of its
  reference (``references[name]``; the first fn's by default)."""
  names = list(fns)
  ref = [names.index((references or {}).get(n, names[0])) for n in names]
  totals = np.zeros((len(fns), 3), np.int64)  # correct, count, agree
  for batch in loader:
    mask, labels = np.asarray(batch["mask"]), np.asarray(batch["label"])
    preds = [np.asarray(fn(batch["image"])).argmax(-1) for fn in fns.values()]
    for i, pred in enumerate(preds):
      totals[i] += [((pred == labels) & mask).sum(), mask.sum(),
                    ((pred == preds[ref[i]]) & mask).sum()]
  if jax.process_count() > 1:
    totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
  return {name: {"accuracy": t[0] / max(t[1], 1), "agreement": t[2] / max(t[1], 1)}
          for name, t in zip(fns, totals)}


def in_batches_of(fn: Callable, n: int) -> Callable:
  """``fn`` of a static batch of ``n`` images applied to any batch: in chunks of ``n``,
  the last one padded by repeating its last image (the padding's outputs dropped)."""
  def call(images):
    images, out = np.asarray(images), []
    for i in range(0, len(images), n):
      chunk = images[i:i + n]
      fill = n - len(chunk)
      if fill:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fill, axis=0)])
      out.append(np.asarray(fn(chunk))[:n - fill])
    return np.concatenate(out)
  return call


def onnx_runtime_fn(model: bytes, threads: int | None = None) -> Callable:
  """``f(uint8 images) -> logits`` of an ONNX model run by ONNX Runtime (CPU) on
  ``threads`` intra-op threads (default: the cores of the process's CPU set)."""
  import onnxruntime
  opts = onnxruntime.SessionOptions()
  # ONNX Runtime sizes its pool by the machine's cores, not the process's CPU set:
  # more spinning threads than cores (under taskset, in a container) slow it down.
  if threads is None and hasattr(os, "sched_getaffinity"):
    threads = len(os.sched_getaffinity(0))
  opts.intra_op_num_threads = threads or 0
  session = onnxruntime.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
  return lambda images: session.run(["logits"], {"images": np.asarray(images)})[0]


def export_coreml_form(ec: ml_collections.ConfigDict, packed: Any, workdir: str,
                       channels: int) -> dict[str, Any] | None:
  """The report entry of ``model.mlpackage`` as ``ec`` (``cfg.export``) asks (process 0
  only), or None when skipped; a model the export refuses gets an entry with the reason
  and no package. Not evaluated: Core ML predicts only on Apple platforms."""
  import shutil
  path = os.path.join(workdir, "model.mlpackage")
  entry = None
  if ec.coreml == "auto" and not config_lib.coreml_available():
    logging.info("model.mlpackage skipped: coremltools is not installed "
                 "(pip install 'repvgg-jax[coreml]')")
  elif ec.coreml != "off":
    logging.info("exporting model.mlpackage (Core ML, iOS 18 / macOS 15)")
    try:
      repvgg_jax.export_coreml(packed, path, channels=channels)
    except ValueError as e:
      logging.warning("model.mlpackage not written: %s", e)
      entry = {"error": str(e)}
    else:
      entry = {"size_bytes": sum(os.path.getsize(os.path.join(d, f))
                                 for d, _, files in os.walk(path) for f in files)}
  if (entry is None or "error" in entry) and os.path.exists(path):
    shutil.rmtree(path)  # an earlier run's package would not match this model.packed
    logging.info("removed the earlier run's model.mlpackage")
  return entry


def export_onnx_form(ec: ml_collections.ConfigDict, packed: Any, workdir: str,
                     primary: bool) -> tuple[Callable | None, dict[str, Any] | None]:
  """``(ONNX Runtime fn, report entry)`` of ``model.onnx`` as ``ec`` (``cfg.export``)
  asks, or ``(None, None)`` when skipped; a model the export refuses gets an entry
  with the reason and no file (the run's other files stand). Process 0 writes the
  file and evaluates what it reads back."""
  path = os.path.join(workdir, "model.onnx")
  entry, fn = None, None
  if ec.onnx == "auto" and not config_lib.onnx_available():
    logging.info("model.onnx skipped: onnx and onnxruntime are not installed "
                 "(pip install 'repvgg-jax[onnx]')")
  elif ec.onnx != "off":
    logging.info("exporting model.onnx (activations=%s)", ec.onnx_activations)
    try:
      proto = repvgg_jax.export_onnx(packed, path if primary else None,
                                     activations=ec.onnx_activations)
    except ValueError as e:
      logging.warning("model.onnx not written: %s", e)
      entry = {"error": str(e)}
    else:
      data = _read(path) if primary else proto.SerializeToString()
      fn, entry = onnx_runtime_fn(data), {"size_bytes": len(data),
                                          "activations": ec.onnx_activations}
  if fn is None and primary and os.path.exists(path):
    os.remove(path)  # an earlier run's file would not match this model.packed
    logging.info("removed the earlier run's model.onnx")
  return fn, entry


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
    for form, switch, available in (("onnx", ec.onnx, config_lib.onnx_available),
                                    ("coreml", ec.coreml, config_lib.coreml_available)):
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
        ckpt_dir=os.path.join(ckpt_root, "fp"), stage_cfg=cfg.fp, writer=writer,
        log_every=cfg.log_every, evaluate=evaluate_with(eval_plain))
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

      state = train_stage(
          "qat", state, mesh=mesh, loader=loader("train", cfg.qat.batch_size, True),
          train_step=steps.make_train_step(mesh, num_classes, cfg.qat.label_smoothing, q,
                                           pixel_stats=pixels, penalty=stage_penalty(cfg.qat)),
          ckpt_dir=os.path.join(ckpt_root, "qat"), stage_cfg=cfg.qat, writer=writer,
          log_every=cfg.log_every, after_step=refit, evaluate=evaluate_with(eval_qat))
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

    packed = repvgg_jax.export(params, q, quant, repvgg_jax.describe(
        qmodel, image_size=image_shape[0], mean=eval_loader.mean, std=eval_loader.std,
        variant=cfg.model.name, dataset=eval_loader.dataset))
    path, hlo_path = (os.path.join(workdir, f) for f in ("model.packed", "model.stablehlo"))
    hlo_batch = cfg.export.stablehlo_batch or None
    logging.info("exporting model.packed and model.stablehlo (batch %s)", hlo_batch or "any")
    hlo = repvgg_jax.export_stablehlo(packed, hlo_path if primary else None,
                                      batch_size=hlo_batch)
    if primary:
      packed.save(path)
    # Every process evaluates the files' contents (process 0's disk may not be
    # visible to the others, which use the same objects in memory).
    deployed = repvgg_jax.load_packed(path) if primary else repvgg_jax.DeployedModel(packed)
    exported = jax.export.deserialize(_read(hlo_path) if primary else hlo)
    hlo_fn = jax.jit(exported.call)
    fns = {"packed": deployed,
           "stablehlo": in_batches_of(hlo_fn, hlo_batch) if hlo_batch else hlo_fn}
    if qc.act_bits and q.int_scales(params, quant) is not None and not qmodel.variant.se:
      fns["integer"] = deployed.integer
    onnx_fn, onnx_entry = export_onnx_form(cfg.export, packed, workdir, primary)
    if onnx_fn is not None:
      fns["onnx"] = onnx_fn
    logging.info("evaluating %s on the test split", ", ".join(fns))
    measured = evaluate_deployed(fns, eval_loader, {"onnx": "integer" if "integer" in fns
                                                    else "packed"})
    forms["packed"] = {"accuracy": measured["packed"]["accuracy"],
                       "size_bytes": int(deployed.size_bytes()), **bits}
    forms["stablehlo"] = {"accuracy": measured["stablehlo"]["accuracy"],
                          "size_bytes": len(hlo), **bits}
    if "integer" in measured:
      forms["integer"] = {**measured["integer"], **bits}
    if onnx_entry is not None:
      forms["onnx"] = {**measured.get("onnx", {}), **onnx_entry, **bits}
    coreml_entry = (export_coreml_form(cfg.export, packed, workdir, image_shape[-1])
                    if primary else None)
    if coreml_entry is not None:
      forms["coreml"] = {**coreml_entry, **bits}
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
